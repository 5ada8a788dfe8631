//! Template packages through the CLI: export a template, import it under another name
//! (same fingerprint, same bytes), and a package with one flipped byte is refused with a
//! clear error while the pool stays untouched.

use e2e_tests::{pattern, Ctl};

#[test]
fn export_import_round_trip_and_tamper_refusal() {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "4G"]);
    let img = ctl.root.join("t.img");
    let mut data = pattern(11, 24 << 20);
    // Zero and duplicate regions, as in real filesystems.
    data[4 << 20..8 << 20].fill(0);
    let dup = data[8 << 20..9 << 20].to_vec();
    data[12 << 20..13 << 20].copy_from_slice(&dup);
    std::fs::write(&img, &data).unwrap();
    ctl.ok(&[
        "template",
        "create",
        "tpl",
        "--from-image",
        img.to_str().unwrap(),
    ]);
    let info = ctl.json(&["template", "info", "tpl"]);
    let fp = info["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fp.len(), 64, "{info}");

    let pkg = ctl.root.join("tpl.qtpl");
    ctl.ok(&["template", "export", "tpl", pkg.to_str().unwrap()]);
    let size = std::fs::metadata(&pkg).unwrap().len();
    assert!(
        size < data.len() as u64,
        "the package is compressed and deduplicated ({size} bytes)"
    );

    // Tampered copies are refused and leave the pool as it was.
    let bytes = std::fs::read(&pkg).unwrap();
    let before = ctl.json(&["pool", "info"]);
    for pos in [10, bytes.len() / 3, bytes.len() / 2, bytes.len() - 10] {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x01;
        let bad_path = ctl.root.join("bad.qtpl");
        std::fs::write(&bad_path, &bad).unwrap();
        let err = ctl.fails(&[
            "template",
            "import",
            bad_path.to_str().unwrap(),
            "--name",
            "evil",
        ]);
        assert!(
            !err.is_empty(),
            "a flipped byte at {pos} must be refused with a message"
        );
        assert!(ctl.fails(&["template", "info", "evil"]).contains("evil"));
    }
    let truncated = ctl.root.join("trunc.qtpl");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    ctl.fails(&[
        "template",
        "import",
        truncated.to_str().unwrap(),
        "--name",
        "evil",
    ]);
    let after = ctl.json(&["pool", "info"]);
    assert_eq!(
        before["data_used"], after["data_used"],
        "refused imports leave the pool untouched"
    );
    assert_eq!(before["volumes"], after["volumes"]);

    ctl.ok(&[
        "template",
        "import",
        pkg.to_str().unwrap(),
        "--name",
        "copy",
    ]);
    let copy = ctl.json(&["template", "info", "copy"]);
    assert_eq!(copy["fingerprint"], fp.as_str(), "{copy}");
    let out = ctl.root.join("copy.img");
    ctl.ok(&["volume", "export", "copy:root", out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}
