//! placeholder: eBPF objects and map types
