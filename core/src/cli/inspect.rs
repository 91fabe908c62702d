//! `adverse inspect PATH...`: one line per DICOM file with what the pipeline will see (syntax,
//! geometry, bit depth, rescale, window) and whether its pixels decode. Patient identity is
//! never printed: only technical attributes are read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use super::exit;
use crate::dicom::{DecodeLimits, DicomFile};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Files or folders (searched recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    path: String,
    size: u64,
    transfer_syntax_uid: Option<String>,
    transfer_syntax_name: Option<String>,
    modality: Option<String>,
    frames: Option<u32>,
    rows: Option<u32>,
    cols: Option<u32>,
    samples_per_pixel: Option<u16>,
    bits_allocated: Option<u16>,
    bits_stored: Option<u16>,
    pixel_representation: Option<u16>,
    photometric: Option<String>,
    rescale_slope: Option<f64>,
    rescale_intercept: Option<f64>,
    window_center: Vec<f64>,
    window_width: Vec<f64>,
    status: &'static str,
    error_kind: Option<crate::dicom::ErrorKind>,
    error: Option<String>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in &args.paths {
        if !p.exists() {
            eprintln!("adverse inspect: no such file or directory: {}", p.display());
            return Ok(ExitCode::from(exit::USAGE));
        }
        collect(p, &mut files);
    }
    let limits = DecodeLimits::default();
    let mut failed = 0usize;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for f in &files {
        let r = inspect_file(f, &limits);
        if let Some(e) = &r.error {
            failed += 1;
            eprintln!("adverse inspect: {e}");
        }
        let line = if args.json {
            serde_json::to_string(&r)?
        } else {
            text_line(&r)
        };
        if let Err(e) = writeln!(out, "{line}") {
            // A closed pipe (`| head`) ends the listing quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::from(exit::OK));
            }
            return Err(e.into());
        }
    }
    if let Err(e) = out.flush()
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    Ok(ExitCode::from(if failed > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    }))
}

fn collect(p: &Path, files: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut found: Vec<PathBuf> = walkdir::WalkDir::new(p)
            .follow_links(false)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect();
        found.sort();
        files.extend(found);
    } else {
        files.push(p.to_path_buf());
    }
}

fn inspect_file(path: &Path, limits: &DecodeLimits) -> Report {
    let mut r = Report {
        path: path.display().to_string(),
        size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        status: "ok",
        ..Report::default()
    };
    let file = match DicomFile::open(path, limits) {
        Ok(f) => f,
        Err(e) => {
            r.status = "error";
            r.error_kind = Some(e.kind());
            r.error = Some(e.to_string());
            return r;
        }
    };
    use dicom_dictionary_std::tags;
    let uint = |t| file.string(t).and_then(|s| s.parse::<u32>().ok());
    r.transfer_syntax_uid = Some(file.transfer_syntax().to_string());
    r.transfer_syntax_name = Some(file.transfer_syntax_name());
    r.modality = file.string(tags::MODALITY);
    r.frames = Some(uint(tags::NUMBER_OF_FRAMES).unwrap_or(1));
    r.rows = uint(tags::ROWS);
    r.cols = uint(tags::COLUMNS);
    r.samples_per_pixel = uint(tags::SAMPLES_PER_PIXEL).map(|v| v as u16);
    r.bits_allocated = uint(tags::BITS_ALLOCATED).map(|v| v as u16);
    r.bits_stored = uint(tags::BITS_STORED).map(|v| v as u16);
    r.pixel_representation = uint(tags::PIXEL_REPRESENTATION).map(|v| v as u16);
    r.photometric = file.string(tags::PHOTOMETRIC_INTERPRETATION);
    match file.decode(limits) {
        Ok(img) => {
            let m = img.meta;
            r.frames = Some(m.frames);
            r.rows = Some(m.rows);
            r.cols = Some(m.cols);
            r.samples_per_pixel = Some(m.samples_per_pixel);
            r.bits_allocated = Some(m.bits_allocated);
            r.bits_stored = Some(m.bits_stored);
            r.pixel_representation = Some(m.pixel_representation);
            r.photometric = Some(m.photometric);
            r.rescale_slope = Some(m.rescale_slope);
            r.rescale_intercept = Some(m.rescale_intercept);
            r.window_center = m.window_center;
            r.window_width = m.window_width;
        }
        Err(e) => {
            r.status = "error";
            r.error_kind = Some(e.kind());
            r.error = Some(e.to_string());
        }
    }
    r
}

fn text_line(r: &Report) -> String {
    fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
        v.as_ref().map_or("-".into(), |x| x.to_string())
    }
    let window = if r.window_center.is_empty() {
        "-".to_string()
    } else {
        r.window_center
            .iter()
            .zip(&r.window_width)
            .map(|(c, w)| format!("{c}/{w}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let signed = match r.pixel_representation {
        Some(1) => "s",
        Some(_) => "u",
        None => "",
    };
    let status = match (&r.error_kind, r.status) {
        (Some(k), _) => format!("error:{}", serde_json::to_value(k).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()),
        (None, s) => s.to_string(),
    };
    format!(
        "{}  ts={} modality={} size={} frames={} dims={}x{}x{} bits={}/{}{} pi={} rescale={}*x+{} window={} status={}",
        r.path,
        opt(&r.transfer_syntax_name).replace(' ', "_"),
        opt(&r.modality),
        r.size,
        opt(&r.frames),
        opt(&r.rows),
        opt(&r.cols),
        opt(&r.samples_per_pixel),
        opt(&r.bits_stored),
        opt(&r.bits_allocated),
        signed,
        opt(&r.photometric).replace(' ', "_"),
        opt(&r.rescale_slope),
        opt(&r.rescale_intercept),
        window,
        status
    )
}
