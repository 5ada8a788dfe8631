//! Generates bindings to libxlutil.h (xl's config parser) and the libxl disk
//! initialisers it needs, from the host's libxen-dev headers.

use std::env;
use std::path::PathBuf;

fn main() {
    let header = "/usr/include/libxlutil.h";
    if !std::path::Path::new(header).exists() {
        panic!("{header} not found: run scripts/install-deps.sh (package libxen-dev)");
    }
    println!("cargo:rerun-if-changed={header}");
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rustc-link-lib=xlutil");
    println!("cargo:rustc-link-lib=xenlight");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("xlu_cfg_.*")
        .allowlist_function("xlu_disk_parse")
        .allowlist_function("libxl_device_disk_(init|dispose)")
        .allowlist_type("libxl_device_disk")
        .allowlist_type("libxl_disk_(format|backend)")
        .allowlist_var("LIBXL_DISK_.*")
        .newtype_enum("libxl_disk_(format|backend)")
        .derive_default(false)
        .layout_tests(false)
        .generate()
        .expect("bindgen failed on libxlutil.h");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
