//! How the agent asks glibc's allocator to hand memory back.
//!
//! Left to its defaults, glibc raises its mmap threshold to the size of
//! the largest block freed (up to 32 MiB): after the first `/metrics`
//! body (MiBs at thousands of processes) is replaced, every later body,
//! snapshot and map comes from the arenas, whose freed pages stay
//! resident. At 8,192 processes that kept about 11 MiB more resident than
//! the live heap (`cargo xtask bench`, §2). A fixed threshold keeps large
//! blocks in their own mappings, returned whole on `free`; two arenas
//! bound what several sampler threads strand in arenas of their own.
//! Tunables in the environment (`MALLOC_*`, `GLIBC_TUNABLES`), when set,
//! take precedence.

/// glibc's default initial threshold; fixing it turns the dynamic raise off.
const MMAP_THRESHOLD: i32 = 128 * 1024;
/// Arenas the allocator may create: the sampler's threads allocate little
/// per cycle, so contention is not the cost that matters here.
const ARENAS: i32 = 2;

/// Applies the settings above, unless the environment tunes the
/// allocator; call before any thread starts. A no-op off glibc.
#[allow(unsafe_code)]
pub fn tune() {
    if std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    }) {
        return;
    }
    // SAFETY: mallopt takes two integers and only changes the allocator's
    // parameters; called before other threads exist.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, ARENAS);
    }
}

/// Hands the free pages inside the arenas back to the kernel: once, after
/// start-up, whose scratch (kernel BTF parsed for the probes: ~15 MiB in
/// ~900,000 small blocks) leaves holes under blocks that stay. Not per
/// cycle: a cycle's pages would only be faulted in again. A no-op off glibc.
#[allow(unsafe_code)]
pub fn release_start_up_scratch() {
    // SAFETY: malloc_trim takes an integer and only returns free pages.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
