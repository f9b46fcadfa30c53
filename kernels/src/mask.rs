//! Which keys a query sees, as every attention path (the composition, the CPU kernels, the GPU
//! kernels, the model's dense mask) decides it.

/// Whether a query whose own flag is `query` may see a key (at or before it, inside the window)
/// whose flag is `key`. Flags are 1 for a real token and 0 for padding; rows packed with several
/// sequences number them 1, 2, ... instead: a query then sees only the keys of its own sequence.
/// A padding query (flag 0) sees every real key, as it did before packing existed: its output
/// reaches no loss.
pub fn key_visible(key: f32, query: f32) -> bool {
    key >= 0.5 && (query < 0.5 || key == query)
}
