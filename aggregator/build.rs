// sqlx's `migrate!` embeds the migrations when the crate is compiled, but
// on stable Rust cargo does not see a new file in their directories: a
// new migration would be missing from an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
