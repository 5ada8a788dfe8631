//! libnbd (nbdsh) scripts: structured replies, block status, error codes the server sends.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn structured_reads_and_block_status() {
    for &b in BACKENDS {
        let fx = Fixture::new(b, &[VolSpec::rw("work/private", 8 * MIB)]);
        nbdsh(
            &fx.uri("work/private"),
            r#"
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_cache()
assert not h.is_read_only()
assert h.get_size() == 8 << 20
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
h.pwrite(b"\xaa" * (1 << 20), 0)
h.pwrite(b"\xbb" * (1 << 20), 4 << 20)
h.trim(1 << 20, 0)   # the first MiB becomes a hole again
h.flush()

ext = []
def f(ctx, off, entries, err):
    assert ctx == "base:allocation"
    ext.extend(entries)
h.block_status(8 << 20, 0, f)
pairs = list(zip(ext[0::2], ext[1::2]))
assert sum(l for l, _ in pairs) <= 8 << 20
# hole+zero up to 4 MiB, data at 4..5 MiB, hole after
assert pairs[0] == (4 << 20, 3), pairs
assert pairs[1] == (1 << 20, 0), pairs
assert pairs[2][1] == 3, pairs

ext.clear()
h.block_status(8 << 20, 0, f, nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 2, ext

# A read spanning hole, data, hole comes back as HOLE and DATA chunks.
kinds = []
def chunk(buf, off, status, err):
    kinds.append((status, off, len(buf)))
buf = h.pread_structured(3 << 20, 3 << 20, chunk)
assert buf == bytes(1 << 20) + b"\xbb" * (1 << 20) + bytes(1 << 20)
assert (nbd.READ_HOLE, 3 << 20, 1 << 20) in kinds, kinds
assert (nbd.READ_DATA, 4 << 20, 1 << 20) in kinds, kinds
# Small reads are plain data chunks and zero-length-safe.
assert h.pread(4096, (4 << 20) - 2048) == bytes(2048) + b"\xbb" * 2048
h.cache(1 << 20, 0)
h.zero(65536, 4 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 4 << 20) == bytes(65536)
h.shutdown()
"#,
        );
    }
}

#[test]
fn error_codes_reach_the_client() {
    for &b in BACKENDS {
        let vols = [
            VolSpec {
                name: "work/root",
                size: 4 * MIB,
                read_only: true,
                space: None,
            },
            VolSpec {
                name: "work/small",
                size: 64 * MIB,
                read_only: false,
                space: Some(2 * MIB),
            },
        ];
        let fx = Fixture::new(b, &vols);
        nbdsh(
            &fx.uri("work/root"),
            r#"
h.set_strict_mode(0)   # let the requests reach the server
h.connect_uri(URI)
assert h.is_read_only()
for op in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        op()
        raise AssertionError("write on a read-only export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
# The connection survives the refusals (the write payload was skipped).
assert h.pread(4096, 0) == bytes(4096)
for off, n, want in ((4 << 20, 1, errno.EINVAL), ((4 << 20) - 512, 1024, errno.EINVAL)):
    try:
        h.pread(n, off)
        raise AssertionError("out-of-range read succeeded")
    except nbd.Error as e:
        assert e.errnum == want, e
try:
    h.block_status(4096, 0, lambda *a: 0)
    raise AssertionError("block status without a context succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
h.shutdown()
"#,
        );
        nbdsh(
            &fx.uri("work/small"),
            r#"
h.connect_uri(URI)
h.pwrite(b"y" * 65536, 0)
# Fill the space (2 MiB) from 32 MiB on: some write must fail with ENOSPC.
for i in range(8):
    try:
        h.pwrite(b"z" * (1 << 20), (32 + i) << 20)
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, e
        assert "NoSpace" in e.string or "space" in e.string, e.string
        break
else:
    raise AssertionError("writes beyond the pool's space succeeded")
# Still usable after ENOSPC.
assert h.pread(65536, 0) == b"y" * 65536
h.flush()
h.shutdown()
"#,
        );
    }
}

#[test]
fn another_qubes_export_is_unknown_here() {
    let a = Fixture::new(Backend::File, &[VolSpec::rw("qa/private", MIB)]);
    let _b = Fixture::new(Backend::File, &[VolSpec::rw("qb/private", MIB)]);
    nbdsh(
        &a.uri("qb/private"),
        r#"
h.set_opt_mode(True)
h.connect_uri(URI)
try:
    h.opt_info()
    raise AssertionError("qube B's export answered on qube A's socket")
except nbd.Error as e:
    assert e.errnum == errno.ENOENT, e   # libnbd's rendering of NBD_REP_ERR_UNKNOWN
names = []
h.opt_list(lambda name, desc: names.append(name))
assert names == ["qa/private"], names
h.set_export_name("qa/private")
h.opt_go()
assert h.get_size() == 1 << 20
h.shutdown()
"#,
    );
}
