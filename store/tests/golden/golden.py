#!/usr/bin/env python3
"""golden.py - the kernel-written COW test vectors of store/tests/kernel_golden.rs.

  golden.py regenerate [--only NAME,...] [--work DIR]
      Recreates every vector with the kernel oracle (shared/tools/kernel-oracle): builds the
      origin from the sector pattern below, lets the real kernel's dm-snapshot write the COW
      (kernel-writes.sh, once per run), checks the kernel's results against a host simulation
      and against cowread.py, then writes NAME.cow.gz and manifest.json beside this file.
      Needs KC_CACHE (regenerate.sh sets it) and KC_ORACLE (the oracle's directory).
  golden.py pattern FILE SIZE SEED [--zero-first-sector]
      Writes the sector pattern (a garbage COW when --zero-first-sector).
  golden.py apply FILE SPEC [--target origin|snap]
      Applies a spec's writes to FILE in place, as the guest does.

Sector pattern (the Rust test has the same function, `sector_word`): sector s of an image
made with seed S is the little-endian u64 word(S, s) repeated 64 times, where
  z = ((S << 32) ^ s) + 0x9E3779B97F4A7C15           (mod 2^64)
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9           (mod 2^64)
  z = (z ^ (z >> 27)) * 0x94D049BB133111EB           (mod 2^64)
  word = z ^ (z >> 31)                               (the splitmix64 finaliser)

Spec files: one write per line, "offset_bytes length_bytes pattern_byte [origin|snap]",
'#' starts a comment. Offsets and lengths must be DECIMAL: the guest's kc_fill passes them to
busybox head/dd, which do not take 0x hex (the write is then silently lost). The pattern byte
may be 0x hex.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
M = (1 << 64) - 1
SECTOR = 512
KIB = 1024
MIB = 1024 * 1024


def sector_word(seed, sector):
    z = (((seed << 32) ^ sector) + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def pattern_bytes(size, seed):
    assert size % SECTOR == 0
    return b''.join(sector_word(seed, s).to_bytes(8, 'little') * (SECTOR // 8)
                    for s in range(size // SECTOR))


def parse_spec(path):
    out = []
    for ln, line in enumerate(open(path), 1):
        w = line.split('#', 1)[0].split()
        if not w:
            continue
        if len(w) not in (3, 4) or not (w[0].isdigit() and w[1].isdigit()):
            sys.exit('%s:%d: want "offset length pattern [origin|snap]" (decimal offset/length)'
                     % (path, ln))
        tgt = w[3] if len(w) == 4 else 'origin'
        tgt = 'snap' if tgt == 'snapshot' else tgt
        if tgt not in ('origin', 'snap'):
            sys.exit('%s:%d: bad target %r' % (path, ln, tgt))
        pat = int(w[2], 0)
        assert 0 <= pat <= 255
        out.append((int(w[0]), int(w[1]), pat, tgt))
    return out


def apply_spec(img, spec, target):
    for off, length, pat, tgt in parse_spec(spec):
        if tgt == target:
            assert off + length <= len(img), 'write past the end'
            img[off:off + length] = bytes([pat]) * length


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The vectors. Each has one or more runs of kernel-writes.sh on the same origin and COW images
# (several runs: the kernel appends to the COW it wrote, after a fresh activation).
# expect: 'valid' (snapshot readable after the last run) or 'invalid' (the kernel invalidated
# it: its status is Invalid and its reads fail).

VECTORS = [
    dict(name='c8-mixed', chunk=8, origin=1 * MIB, seed=1, cow=1 * MIB, fill=None,
         specs=['c8-mixed.spec'], expect='valid',
         about='chunk 8: whole-chunk, one-sector and unaligned origin writes, repeated writes '
               'to one chunk, snapshot writes (whole chunk, small unaligned), an origin write '
               'to a chunk the snapshot already owns, the last chunk of the origin'),
    dict(name='c16-mixed', chunk=16, origin=1 * MIB, seed=3, cow=1 * MIB, fill=None,
         specs=['c16-mixed.spec'], expect='valid',
         about='chunk 16 (8 KiB): origin writes and partial-chunk snapshot writes (the page '
               'cache writes 4 KiB pages, so the kernel copies the origin chunk first)'),
    dict(name='c32-mixed', chunk=32, origin=2 * MIB, seed=2, cow=1 * MIB, fill=None,
         specs=['c32-mixed.spec'], expect='valid',
         about='chunk 32 (16 KiB, the default): origin writes, partial-chunk snapshot writes, '
               'two partial writes into one snapshot chunk, an unaligned snapshot write '
               'straddling two chunks'),
    dict(name='c64-mixed', chunk=64, origin=2 * MIB, seed=4, cow=2 * MIB, fill=None,
         specs=['c64-mixed.spec'], expect='valid',
         about='chunk 64 (32 KiB): origin writes across chunk boundaries, partial-chunk '
               'snapshot writes'),
    dict(name='c8-area-full', chunk=8, origin=2 * MIB, seed=5, cow=2 * MIB, fill=105,
         specs=['c8-area-full.spec'], expect='valid',
         about='chunk 8, COW pre-filled with garbage: exactly 256 origin chunks copied, so '
               'metadata area 0 is exactly full; the kernel zeroes area 1 (chunk 258) and '
               'a reload gives next_free 259 (skip_metadata)'),
    dict(name='c8-area-spill', chunk=8, origin=2 * MIB, seed=6, cow=2 * MIB, fill=None,
         specs=['c8-area-spill.spec'], expect='valid',
         about='chunk 8: 300 origin chunks copied: area 0 full (256 records), area 1 holds 44'),
    dict(name='c8-garbage', chunk=8, origin=2 * MIB, seed=7, cow=2 * MIB, fill=107,
         specs=['c8-garbage.spec'], expect='valid',
         about='chunk 8, COW pre-filled with garbage except a zero first sector: the kernel '
               'writes the header chunk, zeroes area 0 and writes the chunks it uses; area 1 '
               'and the unused data chunks keep their garbage'),
    dict(name='c8-overflow', chunk=8, origin=1 * MIB, seed=8, cow=256 * KIB, fill=None,
         specs=['c8-overflow.spec'], expect='invalid',
         about='chunk 8, 256 KiB COW (62 data chunks) and 128 origin chunks written: the '
               'kernel invalidates the snapshot (valid=0 in the header); origin writes go on'),
    dict(name='c8-overflow-area-end', chunk=8, origin=2 * MIB, seed=9, cow=258 * 4 * KIB,
         fill=None, specs=['c8-overflow-area-end.spec'], expect='invalid',
         about='chunk 8, COW of exactly 258 chunks (header, area 0, 256 data chunks): the '
               '256th exception fills area 0, whose commit must zero area 1 at chunk 258, past '
               'the end of the device'),
    dict(name='c8-append-after-full', chunk=8, origin=2 * MIB, seed=10, cow=2 * MIB,
         fill=None, specs=['c8-append-after-full.1.spec', 'c8-append-after-full.2.spec'],
         expect='valid',
         about='chunk 8, two activations: the first fills area 0 exactly (256 records), the '
               'second reloads the COW (next_free 259, past metadata chunk 258) and appends '
               'into area 1'),
    dict(name='c16-append', chunk=16, origin=1 * MIB, seed=11, cow=1 * MIB, fill=None,
         specs=['c16-append.1.spec', 'c16-append.2.spec'], expect='valid',
         about='chunk 16, two activations: the kernel appends to the COW it wrote, including '
               'writes to chunks the snapshot already owns'),
    # Chunk sizes the kernel takes but our store refuses today (Layout::new: 8..=1024 only).
    dict(name='c4-small-chunk', chunk=4, origin=1 * MIB, seed=12, cow=1 * MIB, fill=None,
         specs=['c4-small-chunk.spec'], expect='valid',
         about='chunk 4 (2 KiB): the kernel accepts any power of two that is a multiple of '
               'the logical block size (512 here); 128 records per area, area 0 fills and '
               'area 1 holds the rest'),
    dict(name='c2048-big-chunk', chunk=2048, origin=4 * MIB, seed=13, cow=5 * MIB, fill=None,
         specs=['c2048-big-chunk.spec'], expect='valid',
         about='chunk 2048 (1 MiB): above the 512 KiB lvm2 allows, but the kernel takes it; '
               '65536 records per area'),
]


def kv_lines(text):
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([A-Z0-9_]+)=(.*)$', line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def dm_lines(stderr):
    """The dm-snapshot kernel messages of a run, without timestamps."""
    out = []
    for line in stderr.splitlines():
        m = re.match(r'^guest-dmesg: \[\s*[0-9.]+\] (.*)$', line)
        if m and 'snapshot' in m.group(1):
            out.append(m.group(1))
    return out


def remove_guest_log(stderr):
    """run-guest.sh leaves its serial log in /tmp (its path is on stderr): drop it."""
    m = re.search(r'log: (/tmp/kc-guest\.[A-Za-z0-9]+\.log)', stderr)
    if m and os.path.isfile(m.group(1)):
        os.remove(m.group(1))


def regenerate(args):
    oracle = os.environ.get('KC_ORACLE')
    if not oracle or not os.path.isfile(os.path.join(oracle, 'kernel-writes.sh')):
        sys.exit('golden.py: set KC_ORACLE to the kernel-oracle directory')
    work = args.work
    os.makedirs(work, exist_ok=True)
    only = set(args.only.split(',')) if args.only else None
    manifest_path = os.path.join(HERE, 'manifest.json')
    old = {}
    if os.path.exists(manifest_path):
        old = {v['name']: v for v in json.load(open(manifest_path))['vectors']}
    kver = open(os.path.join(os.environ['KC_CACHE'], 'kver')).read().strip()
    vectors = []
    failures = []
    for v in VECTORS:
        name = v['name']
        if only is not None and name not in only:
            if name in old:
                vectors.append(old[name])
            continue
        d = os.path.join(work, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        base = pattern_bytes(v['origin'], v['seed'])
        origin_img = os.path.join(d, 'origin.img')
        cow_img = os.path.join(d, 'cow.img')
        open(origin_img, 'wb').write(base)
        if v['fill'] is None:
            with open(cow_img, 'wb') as f:
                f.truncate(v['cow'])
        else:
            g = bytearray(pattern_bytes(v['cow'], v['fill']))
            g[:SECTOR] = bytes(SECTOR)
            open(cow_img, 'wb').write(g)
        exp_origin = bytearray(base)
        exp_snap = bytearray(base)
        runs = []
        print('== %s: chunk %d, origin %d, COW %d (%s)' % (
            name, v['chunk'], v['origin'], v['cow'],
            'zero' if v['fill'] is None else 'garbage seed %d' % v['fill']), flush=True)
        for spec_name in v['specs']:
            spec = os.path.join(HERE, 'specs', spec_name)
            apply_spec(exp_origin, spec, 'origin')
            apply_spec(exp_snap, spec, 'snap')
            p = subprocess.run([os.path.join(oracle, 'kernel-writes.sh'), origin_img, cow_img,
                                str(v['chunk']), spec], capture_output=True, text=True)
            open(os.path.join(d, spec_name + '.out'), 'w').write(p.stdout)
            open(os.path.join(d, spec_name + '.err'), 'w').write(p.stderr)
            remove_guest_log(p.stderr)
            kv = kv_lines(p.stdout)
            print('   %s: rc=%d %s' % (spec_name, p.returncode, kv), flush=True)
            # rc 3: a write to the (invalid) snapshot failed - expected only when invalid.
            ok_rc = (0,) if v['expect'] == 'valid' else (0, 3)
            if p.returncode not in ok_rc:
                failures.append('%s %s: kernel-writes.sh exit %d' % (name, spec_name, p.returncode))
            if kv.get('ORIGIN_SHA256') != sha256(exp_origin):
                failures.append('%s %s: kernel origin sha %s != host simulation %s' % (
                    name, spec_name, kv.get('ORIGIN_SHA256'), sha256(exp_origin)))
            runs.append(dict(spec='specs/' + spec_name, rc=p.returncode,
                             kernel={k: kv[k] for k in sorted(kv)}, dmesg=dm_lines(p.stderr)))
        cow = open(cow_img, 'rb').read()
        origin_after = open(origin_img, 'rb').read()
        if sha256(origin_after) != sha256(exp_origin):
            failures.append('%s: origin image after the runs differs from the simulation' % name)
        last = runs[-1]['kernel']
        info = json.loads(subprocess.run([os.path.join(oracle, 'cowread.py'), 'info', '--json',
                                          cow_img], capture_output=True, text=True,
                                         check=True).stdout)
        info.pop('path', None)
        if v['expect'] == 'valid':
            want = sha256(exp_snap)
            for k in ('SNAP_SHA256', 'SNAP_SHA256_RELOAD'):
                if last.get(k) != want:
                    failures.append('%s: kernel %s %s != host simulation %s' % (
                        name, k, last.get(k), want))
            cr = subprocess.run([os.path.join(oracle, 'cowread.py'), 'sha256', origin_img, cow_img],
                                capture_output=True, text=True).stdout.strip()
            if cr != want:
                failures.append('%s: cowread.py sha256 %s != %s' % (name, cr, want))
            body = last.get('STATUS_RELOAD', '').split(' snapshot ', 1)[-1]
            if body != info.get('expected_status'):
                failures.append('%s: STATUS_RELOAD %r != cowread prediction %r' % (
                    name, body, info.get('expected_status')))
        else:
            want = None
            for k in ('STATUS_LIVE', 'STATUS_RELOAD'):
                if not last.get(k, '').endswith(' snapshot Invalid'):
                    failures.append('%s: %s is %r, not Invalid' % (name, k, last.get(k)))
        with open(os.path.join(HERE, name + '.cow.gz'), 'wb') as f:
            f.write(gzip.compress(cow, compresslevel=9, mtime=0))
        vectors.append(dict(
            name=name,
            about=v['about'],
            chunk_sectors=v['chunk'],
            origin_bytes=v['origin'],
            origin_seed=v['seed'],
            cow_bytes=v['cow'],
            cow_garbage_seed=v['fill'],
            cow_file=name + '.cow.gz',
            cow_sha256=sha256(cow),
            expect_valid=v['expect'] == 'valid',
            snap_sha256=want,
            origin_sha256=sha256(exp_origin),
            status_live=last.get('STATUS_LIVE'),
            status_reload=last.get('STATUS_RELOAD'),
            cowread=info,
            runs=runs,
        ))
    manifest = dict(
        comment='Written by golden.py regenerate (see README.md); do not edit by hand.',
        kernel=kver,
        pattern='sector s of an image with seed S: le64 sector_word(S, s) repeated 64 times '
                '(see golden.py); a garbage COW is that pattern with its first sector zeroed',
        vectors=vectors,
    )
    with open(manifest_path, 'w') as f:
        json.dump(manifest, f, indent=1)
        f.write('\n')
    if failures:
        print('\n'.join('FAIL: ' + x for x in failures))
        sys.exit(1)
    print('%d vectors written to %s' % (len(vectors), HERE))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('regenerate')
    p.add_argument('--only', help='comma-separated vector names (the others are kept)')
    p.add_argument('--work', default='/var/tmp/cowsnap-golden',
                   help='scratch directory on a disk file system')
    p = sub.add_parser('pattern')
    p.add_argument('file'); p.add_argument('size', type=int); p.add_argument('seed', type=int)
    p.add_argument('--zero-first-sector', action='store_true')
    p = sub.add_parser('apply')
    p.add_argument('file'); p.add_argument('spec')
    p.add_argument('--target', default='origin', choices=['origin', 'snap'])
    a = ap.parse_args()
    if a.cmd == 'regenerate':
        regenerate(a)
    elif a.cmd == 'pattern':
        b = bytearray(pattern_bytes(a.size, a.seed))
        if a.zero_first_sector:
            b[:SECTOR] = bytes(SECTOR)
        open(a.file, 'wb').write(b)
    elif a.cmd == 'apply':
        img = bytearray(open(a.file, 'rb').read())
        apply_spec(img, a.spec, a.target)
        open(a.file, 'wb').write(img)


if __name__ == '__main__':
    main()
