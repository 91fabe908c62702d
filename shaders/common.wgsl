// Prepended to every kernel family by core/src/runtime/gpu/context.rs (WGSL has no includes).

// Large dispatches are folded onto a 2-D grid because one grid dimension is limited (65535 on
// most devices); every kernel recovers its linear workgroup index with this.
fn wg_linear(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
