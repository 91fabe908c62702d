//! The `adverse` binary: a thin shell over the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_vulkan_device_select();
    match adverse::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("adverse: error: {err:#}");
            ExitCode::from(adverse::cli::exit::USAGE)
        }
    }
}

/// Mesa's implicit `VK_LAYER_MESA_device_select` layer connects to Wayland/X11 to order GPUs and,
/// on a headless machine, prints "error: XDG_RUNTIME_DIR is invalid" on every probe. wgpu picks
/// the adapter itself, so the layer adds nothing here; `NODEVICE_SELECT=1` (the layer's own
/// switch) turns it off unless the user set it.
fn quiet_vulkan_device_select() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: called first thing in `main`, before any thread exists, so no other thread
        // can read or write the environment concurrently.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
