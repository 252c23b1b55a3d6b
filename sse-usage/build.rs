// The module links libgcc statically: Envoy's image (and the test node's, built from the same
// binary with only Envoy's own libraries) need not have libgcc_s, which Rust's standard library
// otherwise loads for unwinding. What remains is glibc, which every Envoy image has.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-static-libgcc");
}
