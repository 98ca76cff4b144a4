//! Local quota enforcement: tenant cgroups, device access, GPU memory and
//! time actions, and the hash-chained audit log. (Filled in by the
//! enforcement issue.)
