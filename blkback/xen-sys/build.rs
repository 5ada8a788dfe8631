//! Generates bindings to the Xen userspace libraries a blkif backend needs (xenstore,
//! grant tables, event channels) and to the blkif ring structs, from the host's
//! libxen-dev headers. Layout tests stay on: they check the generated x86_64 ABI of
//! the ring structs against the C compiler's view of `xen/io/blkif.h`.

use std::env;
use std::path::PathBuf;

fn main() {
    for header in [
        "/usr/include/xenstore.h",
        "/usr/include/xengnttab.h",
        "/usr/include/xenevtchn.h",
        "/usr/include/xen/io/blkif.h",
    ] {
        if !std::path::Path::new(header).exists() {
            panic!("{header} not found: run scripts/install-deps.sh (package libxen-dev)");
        }
        println!("cargo:rerun-if-changed={header}");
    }
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rustc-link-lib=xenstore");
    println!("cargo:rustc-link-lib=xengnttab");
    println!("cargo:rustc-link-lib=xenevtchn");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("xs_(open|close|read|write|directory|rm|mkdir|watch|unwatch|read_watch|check_watch|fileno|transaction_start|transaction_end|get_domain_path|set_permissions|get_permissions)")
        .allowlist_function("xengnttab_(open|close|fd|map_domain_grant_refs|unmap|grant_copy|set_max_grants)")
        .allowlist_function("xenevtchn_(open|close|fd|notify|bind_interdomain|unbind|pending|unmask)")
        .allowlist_type("blkif_.*")
        .allowlist_type("xenbus_state")
        .allowlist_type("xs_watch_type")
        .allowlist_type("xs_permissions")
        .allowlist_var("BLKIF_.*")
        .allowlist_var("VDISK_.*")
        .allowlist_var("GNTCOPY_.*")
        .allowlist_var("GNTST_.*")
        .allowlist_var("XS_.*")
        .newtype_enum("xenbus_state")
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen failed on the Xen headers");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
