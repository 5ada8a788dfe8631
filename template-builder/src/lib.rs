//! Template builder: recipes -> root filesystem -> reproducible image (+ kernel/initrd),
//! and portable template packages.
//!
//! * [`recipe`]: TOML recipes, `extends` merging, errors with file:line:column.
//! * [`build`]: mmdebstrap / dnf bootstrap, customisation, cache; [`build::build`].
//! * [`image`]: reproducible ext4 (`mke2fs -d`, derived UUID and hash seed, clamped times).
//! * [`package`]: one-file template packages (manifest, per-chunk blake3, zstd, dedup).
//!
//! Data flows one way: recipe -> tree -> image -> (the controller) pool volume.

pub mod build;
pub mod fingerprint;
pub mod image;
pub mod package;
pub mod recipe;
pub mod repo;

pub use build::{build, BuildError, BuildOptions, BuiltTemplate};
pub use fingerprint::FingerprintReader;
pub use package::{
    export_package, read_package, ExportStats, PackageError, PackageManifest, RawImageFile,
    TemplateMeta, VerifiedPackage,
};
pub use recipe::{Recipe, RecipeError};
