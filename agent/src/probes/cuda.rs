//! Where the CUDA driver library is, and which of its entry points copy
//! between host and device.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

/// Argument shape of a copy entry point = the eBPF program that counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `(CUdeviceptr dst, const void *src, size_t n, …)`.
    HtoD,
    /// `(void *dst, CUdeviceptr src, size_t n, …)`.
    DtoH,
    /// The pre-`_v2` ABI: 32-bit pointers and sizes.
    HtoDV1,
    DtoHV1,
    /// `(dst, src, size_t n, …)` under unified addressing: direction unknown.
    Generic,
    /// `(const CUDA_MEMCPY2D *p, …)`: the descriptor tells the direction.
    Copy2D,
}

impl Shape {
    /// The program in `pcie.bpf.c` for this shape.
    pub fn program(self) -> &'static str {
        match self {
            Shape::HtoD => "tally_cu_htod",
            Shape::DtoH => "tally_cu_dtoh",
            Shape::HtoDV1 => "tally_cu_htod_v1",
            Shape::DtoHV1 => "tally_cu_dtoh_v1",
            Shape::Generic => "tally_cu_generic",
            Shape::Copy2D => "tally_cu_2d",
        }
    }

    pub const ALL: [Shape; 6] = [
        Shape::HtoD,
        Shape::DtoH,
        Shape::HtoDV1,
        Shape::DtoHV1,
        Shape::Generic,
        Shape::Copy2D,
    ];
}

/// Every `cuMemcpy*` entry point that moves bytes between host and device,
/// in every ABI form libcuda exports (`_v2`, `Async`, per-thread default
/// stream `_ptds`/`_ptsz`). CUDA runtimes that find the driver through
/// `cuGetProcAddress` still land on these exported functions.
pub const SYMBOLS: &[(&str, Shape)] = &[
    ("cuMemcpyHtoD", Shape::HtoDV1),
    ("cuMemcpyHtoD_v2", Shape::HtoD),
    ("cuMemcpyHtoD_v2_ptds", Shape::HtoD),
    ("cuMemcpyHtoDAsync", Shape::HtoDV1),
    ("cuMemcpyHtoDAsync_v2", Shape::HtoD),
    ("cuMemcpyHtoDAsync_v2_ptsz", Shape::HtoD),
    ("cuMemcpyDtoH", Shape::DtoHV1),
    ("cuMemcpyDtoH_v2", Shape::DtoH),
    ("cuMemcpyDtoH_v2_ptds", Shape::DtoH),
    ("cuMemcpyDtoHAsync", Shape::DtoHV1),
    ("cuMemcpyDtoHAsync_v2", Shape::DtoH),
    ("cuMemcpyDtoHAsync_v2_ptsz", Shape::DtoH),
    ("cuMemcpy", Shape::Generic),
    ("cuMemcpy_ptds", Shape::Generic),
    ("cuMemcpyAsync", Shape::Generic),
    ("cuMemcpyAsync_ptsz", Shape::Generic),
    ("cuMemcpy2D_v2", Shape::Copy2D),
    ("cuMemcpy2D_v2_ptds", Shape::Copy2D),
    ("cuMemcpy2DUnaligned_v2", Shape::Copy2D),
    ("cuMemcpy2DUnaligned_v2_ptds", Shape::Copy2D),
    ("cuMemcpy2DAsync_v2", Shape::Copy2D),
    ("cuMemcpy2DAsync_v2_ptsz", Shape::Copy2D),
];

/// File name of the driver library.
pub const LIBCUDA: &str = "libcuda.so.1";

/// Directories NVIDIA drivers install into, host and GPU-operator layouts.
pub const DRIVER_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/nvidia/lib64",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu",
    "/run/nvidia/driver/usr/lib64",
];

/// The driver libraries on this host: the dynamic loader's cache
/// (`ldconfig -p`), then the usual driver directories; canonical paths, each
/// once (uprobes attach to the file, so two links to one file count once).
pub fn discover() -> Vec<PathBuf> {
    let mut found = BTreeSet::new();
    let mut ordered = Vec::new();
    let mut add = |p: PathBuf| {
        if let Ok(real) = p.canonicalize()
            && found.insert(real.clone())
        {
            ordered.push(real);
        }
    };
    for p in ldconfig_paths() {
        add(p);
    }
    for dir in DRIVER_DIRS {
        let p = Path::new(dir).join(LIBCUDA);
        if p.exists() {
            add(p);
        }
    }
    ordered
}

/// `libcuda.so*` entries of `ldconfig -p`.
fn ldconfig_paths() -> Vec<PathBuf> {
    let output = ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|cmd| Command::new(cmd).arg("-p").output().ok());
    let Some(output) = output else {
        return Vec::new();
    };
    parse_ldconfig(&String::from_utf8_lossy(&output.stdout))
}

/// Parses `ldconfig -p` lines such as
/// `\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1`.
pub fn parse_ldconfig(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (name, path) = line.trim().split_once(" => ")?;
            let name = name.split_whitespace().next()?;
            let is_driver = name == LIBCUDA || name == "libcuda.so";
            // 32-bit libraries cannot be probed from a 64-bit process's view.
            (is_driver && line.contains("x86-64")).then(|| PathBuf::from(path.trim()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldconfig_output_gives_64_bit_driver_paths() {
        let text = "1234 libs found in cache `/etc/ld.so.cache'\n\
            \tlibcudart.so.12 (libc6,x86-64) => /usr/lib/libcudart.so.12\n\
            \tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n\
            \tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1\n\
            \tlibcuda.so (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so\n";
        assert_eq!(
            parse_ldconfig(text),
            [
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so"),
            ]
        );
    }

    #[test]
    fn every_symbol_names_a_program_of_the_object() {
        let text = String::from_utf8_lossy(tally_ebpf::PCIE);
        for shape in Shape::ALL {
            assert!(text.contains(shape.program()), "{}", shape.program());
        }
        let names: BTreeSet<_> = SYMBOLS.iter().map(|(s, _)| *s).collect();
        assert_eq!(names.len(), SYMBOLS.len(), "a symbol is listed twice");
    }
}
