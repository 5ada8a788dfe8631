//! Generates bindings to liblvm2cmd (`lvm2cmd.h` of liblvm2-dev 2.03) as a struct of
//! function pointers resolved with dlopen at run time: a qubes-ctl that never opens an
//! `lvm_thin` pool runs on machines without liblvm2cmd, and one that does gets an error
//! naming the package instead of a loader failure at startup.

use std::env;
use std::path::PathBuf;

fn main() {
    let header = "/usr/include/lvm2cmd.h";
    if !std::path::Path::new(header).exists() {
        panic!("{header} not found: run scripts/install-deps.sh (package liblvm2-dev)");
    }
    println!("cargo:rerun-if-changed={header}");
    let bindings = bindgen::Builder::default()
        .header(header)
        .allowlist_function("lvm2_(init|run|log_fn|log_level|exit|disable_dmeventd_monitoring)")
        .allowlist_type("lvm2_log_fn_t")
        .allowlist_var("LVM2_.*")
        .dynamic_library_name("Lvm2Cmd")
        .dynamic_link_require_all(true)
        .generate()
        .expect("bindgen failed on lvm2cmd.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
