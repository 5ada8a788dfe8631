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
    // The record's fingerprint is the pool's own hash of the imported bytes.
    let got_fp = blake3::hash(&data).to_hex().to_string();
    assert_eq!(copy["fingerprint"], got_fp.as_str(), "{copy}");
    let out = ctl.root.join("copy.img");
    ctl.ok(&["volume", "export", "copy:root", out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}

/// Rewrites a package's manifest fingerprint and re-seals the header (manifest hash and
/// header checksum), as a forger would: every chunk hash still matches its bytes.
fn forge_fingerprint(pkg: &[u8], fake: &str) -> Vec<u8> {
    let u64_at = |o: usize| u64::from_le_bytes(pkg[o..o + 8].try_into().unwrap()) as usize;
    let (moff, mlen) = (u64_at(16), u64_at(24));
    let mut m: serde_json::Value = serde_json::from_slice(&pkg[moff..moff + mlen]).unwrap();
    m["fingerprint"] = fake.into();
    let mjson = serde_json::to_vec(&m).unwrap();
    let mut out = pkg[..moff].to_vec();
    out[24..32].copy_from_slice(&(mjson.len() as u64).to_le_bytes());
    out[32..64].copy_from_slice(blake3::hash(&mjson).as_bytes());
    let sum = *blake3::hash(&out[..96]).as_bytes();
    out[96..128].copy_from_slice(&sum);
    out.extend_from_slice(&mjson);
    out
}

/// A package whose bytes are self-consistent but whose manifest claims another image's
/// fingerprint (an official build's) is refused, and the pool is left as it was. Failed
/// on the old code, which copied the claim into the template record.
#[test]
fn forged_fingerprint_is_refused() {
    let ctl = Ctl::new();
    ctl.ok(&["pool", "init", "--size", "2G"]);
    let official = ctl.root.join("official.img");
    std::fs::write(&official, pattern(1, 6 << 20)).unwrap();
    let evil = ctl.root.join("evil.img");
    std::fs::write(&evil, pattern(2, 6 << 20)).unwrap();
    for (name, img) in [("official", &official), ("evil", &evil)] {
        ctl.ok(&[
            "template",
            "create",
            name,
            "--from-image",
            img.to_str().unwrap(),
        ]);
    }
    let official_fp = ctl.json(&["template", "info", "official"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let pkg = ctl.root.join("evil.qtpl");
    ctl.ok(&["template", "export", "evil", pkg.to_str().unwrap()]);
    let forged = ctl.root.join("forged.qtpl");
    std::fs::write(
        &forged,
        forge_fingerprint(&std::fs::read(&pkg).unwrap(), &official_fp),
    )
    .unwrap();
    let before = ctl.json(&["pool", "info"]);
    let err = ctl.fails(&[
        "template",
        "import",
        forged.to_str().unwrap(),
        "--name",
        "looks-official",
    ]);
    assert!(err.contains("fingerprint"), "{err}");
    assert!(ctl
        .fails(&["template", "info", "looks-official"])
        .contains("looks-official"));
    // Replacing an existing template's root (asked for with --replace) is refused the
    // same way, its root kept.
    let err = ctl.fails(&[
        "template",
        "import",
        forged.to_str().unwrap(),
        "--name",
        "official",
        "--replace",
    ]);
    assert!(err.contains("fingerprint"), "{err}");
    let info = ctl.json(&["template", "info", "official"]);
    assert_eq!(info["fingerprint"], official_fp.as_str(), "{info}");
    let after = ctl.json(&["pool", "info"]);
    assert_eq!(before["data_used"], after["data_used"], "{before} {after}");
    assert_eq!(before["volumes"], after["volumes"]);
    assert_eq!(ctl.json(&["pool", "verify"])["clean"], true);
}
