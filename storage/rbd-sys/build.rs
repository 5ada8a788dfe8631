//! Generates bindings to librados and librbd from the host's librados-dev/librbd-dev
//! headers (Debian bookworm: Ceph 16.2.15). Only the calls the rbd driver makes are
//! allowlisted, so a newer librbd's additions do not change the generated file.

use std::env;
use std::path::PathBuf;

fn main() {
    for header in ["/usr/include/rados/librados.h", "/usr/include/rbd/librbd.h"] {
        if !std::path::Path::new(header).exists() {
            panic!("{header} not found: run scripts/install-deps.sh (packages librados-dev, librbd-dev)");
        }
        println!("cargo:rerun-if-changed={header}");
    }
    println!("cargo:rerun-if-changed=wrapper.h");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("rados_(ioctx_set_namespace|create2|conf_read_file|conf_set|connect|shutdown|ioctx_create|ioctx_destroy|ioctx_pool_stat|cluster_stat|getaddrs|get_instance_id)")
        .allowlist_function("rbd_(namespace_create|namespace_exists|open|open_read_only|open_by_id_read_only|close|stat|get_size|resize|create4|clone3|remove|rename|list2|image_spec_list_cleanup|image_options_(create|destroy|set_uint64)|snap_(create|remove|list|list_end|rollback)|flatten|get_parent|linked_image_spec_cleanup|snap_spec_cleanup|metadata_(get|set|remove|list)|pool_metadata_(get|set|remove|list)|diff_iterate2|lock_(acquire|release|get_owners|get_owners_cleanup|break)|is_exclusive_lock_owner|trash_(move|purge)|aio_(create_completion|release|wait_for_complete|get_return_value|read2|write2|flush|discard|write_zeroes))")
        .allowlist_var("RBD_.*")
        .allowlist_var("LIBRADOS_.*")
        .allowlist_type("rbd_lock_mode_t")
        .derive_default(true)
        // Loaded at run time (librbd.so.1, which pulls in librados.so.2): their C++
        // constructors cost every process ~16 ms at start, and a host without Ceph's
        // libraries must still run qubes-ctl for its other drivers.
        .dynamic_library_name("Ceph")
        .dynamic_link_require_all(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen failed on the librados/librbd headers");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
