#!/usr/bin/env python3
"""Builds an OCI image archive (one uncompressed layer) from files of this machine, without a
container engine or a registry. Python 3.11 standard library only; no root needed.

    mkimage.py --out ARCHIVE --ref REF [content...] [config...]

Content (paths in the image are absolute; parents are created 0755 root:root):
  --file SRC:DEST[:MODE]     a file (SRC's content; MODE octal, default SRC's permission bits)
  --tree SRC:DEST[:GLOB,...] a directory tree; symbolic links inside it are kept as links; paths
                             matching a GLOB are left out (a GLOB with '/' is matched against the
                             path relative to SRC, one without against the name)
  --dir DEST[:MODE]          a directory
  --symlink DEST:TARGET      a symbolic link
  --text DEST:MODE:TEXT      a file with TEXT ('\\n' for newlines)
  --user NAME:UID:GID[:HOME] an /etc/passwd and /etc/group entry (root is always there)
  --chown DEST:UID:GID       owner of DEST and of everything under it
  --ca-certs                 /etc/ssl/certs/ca-certificates.crt of this machine
  --libs                     the shared libraries (ldd) of every ELF file added, with the loader
Config:
  --entrypoint JSON --cmd JSON --workdir DIR --env K=V (repeatable) --run-as USER[:GROUP]
  --label K=V (repeatable)

Every image gets the Debian merged-/usr layout (/bin, /sbin, /lib, /lib64 link into /usr), /tmp
(1777), /etc/passwd, /etc/group and /etc/nsswitch.conf. The output is reproducible: entries are
sorted, owners are numeric, times are 0 except a copied file's (its own modification time, which
Python's .pyc files are checked against). containerd imports it with `ctr images import` under REF
(the index names it with io.containerd.image.name and org.opencontainers.image.ref.name).
"""

import argparse
import fnmatch
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile

MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
SYSTEM_LIB_DIRS = ("usr/lib/", "usr/lib64/")
MULTIARCH_LIB_DIR = "usr/lib/x86_64-linux-gnu"


class Entry:
    __slots__ = ("kind", "mode", "uid", "gid", "src", "data", "target")

    def __init__(self, kind, mode, src=None, data=None, target=None):
        self.kind, self.mode, self.src, self.data, self.target = kind, mode, src, data, target
        self.uid = self.gid = 0


class Image:
    def __init__(self):
        self.entries = {}  # image path without leading '/' -> Entry
        self.elf = []  # host paths of ELF files added, for --libs

    @staticmethod
    def norm(dest):
        """Image path of DEST, with the merged-/usr links resolved in its first component."""
        p = os.path.normpath("/" + dest).lstrip("/")
        if not p:
            raise SystemExit("mkimage: empty destination")
        first, _, rest = p.partition("/")
        if first in MERGED_USR and rest:
            p = MERGED_USR[first] + "/" + rest
        return p

    def parents(self, p):
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            e = self.entries.get(d)
            if e is None:
                self.entries[d] = Entry("dir", 0o755)
            elif e.kind == "symlink" and d in MERGED_USR:
                raise SystemExit(f"mkimage: {p} goes through the link /{d}")

    def add_dir(self, dest, mode=0o755):
        p = self.norm(dest)
        self.parents(p)
        e = self.entries.get(p)
        if e is None or e.kind != "dir":
            self.entries[p] = Entry("dir", mode)
        else:
            e.mode = mode
        return p

    def add_file(self, src, dest, mode=None):
        st = os.stat(src)  # follows links: the content
        if not stat.S_ISREG(st.st_mode):
            raise SystemExit(f"mkimage: {src} is not a regular file")
        p = self.norm(dest)
        self.parents(p)
        self.entries[p] = Entry("file", stat.S_IMODE(st.st_mode) if mode is None else mode, src=src)
        if is_elf(src):
            self.elf.append(src)
        return p

    def add_data(self, dest, data, mode=0o644):
        p = self.norm(dest)
        self.parents(p)
        self.entries[p] = Entry("file", mode, data=data)
        return p

    def add_symlink(self, dest, target):
        p = os.path.normpath("/" + dest).lstrip("/")
        if p not in MERGED_USR:
            p = self.norm(dest)
        self.parents(p)
        self.entries[p] = Entry("symlink", 0o777, target=target)
        return p

    def add_tree(self, src, dest, excludes):
        src = os.path.abspath(src)
        base = self.add_dir(dest, stat.S_IMODE(os.stat(src).st_mode))
        for root, dirs, files in os.walk(src):
            rel_root = os.path.relpath(root, src)
            keep = []
            for d in sorted(dirs):
                rel = os.path.normpath(os.path.join(rel_root, d))
                full = os.path.join(root, d)
                if excluded(rel, excludes):
                    continue
                if os.path.islink(full):
                    self.add_symlink(f"{base}/{rel}", os.readlink(full))
                    continue
                self.add_dir(f"{base}/{rel}", stat.S_IMODE(os.lstat(full).st_mode))
                keep.append(d)
            dirs[:] = keep
            for f in sorted(files):
                rel = os.path.normpath(os.path.join(rel_root, f))
                full = os.path.join(root, f)
                if excluded(rel, excludes):
                    continue
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(f"{base}/{rel}", os.readlink(full))
                elif stat.S_ISREG(st.st_mode):
                    self.add_file(full, f"{base}/{rel}", stat.S_IMODE(st.st_mode))

    def chown(self, dest, uid, gid):
        p = self.norm(dest)
        for k, e in self.entries.items():
            if k == p or k.startswith(p + "/"):
                e.uid, e.gid = uid, gid

    def add_libs(self):
        """Adds what the dynamic loader needs for every ELF file added so far (transitively: ldd
        lists the whole closure). A library from outside /lib and /usr/lib (e.g. a relocated
        prefix's libpython) goes to /usr/lib/x86_64-linux-gnu, where the loader looks by default."""
        seen = set()
        for f in list(self.elf):
            for lib in ldd(f):
                if lib in seen:
                    continue
                seen.add(lib)
                self.add_host_path(lib)

    def add_host_path(self, host):
        """Adds a host file at its own path, with each symbolic link on the way (a chain such as
        /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2)."""
        for _ in range(10):
            p = self.norm(host)
            if not p.startswith(SYSTEM_LIB_DIRS):
                p = f"{MULTIARCH_LIB_DIR}/{os.path.basename(host)}"
            parent_real = os.path.realpath(os.path.dirname(host))
            if os.path.islink(host):
                target = os.readlink(host)
                self.add_symlink(p, target)
                host = os.path.normpath(os.path.join(parent_real, target))
                continue
            if p not in self.entries:
                st = os.stat(host)
                self.parents(p)
                self.entries[p] = Entry("file", stat.S_IMODE(st.st_mode), src=host)
            return
        raise SystemExit(f"mkimage: too many symbolic links at {host}")


def excluded(rel, patterns):
    name = os.path.basename(rel)
    return any(fnmatch.fnmatch(rel if "/" in pat else name, pat) for pat in patterns)


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+)(?: \(0x[0-9a-f]+\))?\s*$")


def ldd(path):
    """Host paths of the shared libraries (and the loader) PATH needs; none for a static file."""
    r = subprocess.run(["ldd", path], capture_output=True, text=True)
    out = r.stdout + r.stderr
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    if r.returncode != 0:
        raise SystemExit(f"mkimage: ldd {path} failed: {out.strip()}")
    libs = []
    for line in out.splitlines():
        if "=> not found" in line:
            raise SystemExit(f"mkimage: {path} needs a library this machine lacks: {line.strip()}")
        m = LDD_LINE.match(line)
        if not m:
            continue
        lib = m.group(2)
        if lib.startswith("/"):
            libs.append(lib)
    return libs


def split(spec, n, what):
    parts = spec.split(":", n - 1)
    if len(parts) < n:
        raise SystemExit(f"mkimage: {what} wants {n} ':'-separated parts: {spec!r}")
    return parts


def layer_tar(image, out):
    """Writes the layer (a tar of the entries, sorted) to the binary file OUT."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for p in sorted(image.entries):
            e = image.entries[p]
            ti = tarfile.TarInfo(p)
            ti.mtime = 0
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname = ti.gname = ""
            ti.mode = e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif e.kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = e.target
                t.addfile(ti)
            elif e.data is not None:
                ti.size = len(e.data)
                t.addfile(ti, io.BytesIO(e.data))
            else:
                st = os.stat(e.src)
                ti.size = st.st_size
                # A file keeps its time: Python's timestamp-checked .pyc files compare it.
                ti.mtime = int(st.st_mtime)
                with open(e.src, "rb") as f:
                    t.addfile(ti, f)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--tree", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--symlink", action="append", default=[])
    ap.add_argument("--text", action="append", default=[])
    ap.add_argument("--user", action="append", default=[])
    ap.add_argument("--chown", action="append", default=[])
    ap.add_argument("--ca-certs", action="store_true")
    ap.add_argument("--libs", action="store_true")
    ap.add_argument("--entrypoint")
    ap.add_argument("--cmd")
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--run-as")
    ap.add_argument("--label", action="append", default=[])
    a = ap.parse_args()

    img = Image()
    for d, target in MERGED_USR.items():
        img.add_dir(target)
        img.add_symlink(d, target)
    img.add_dir("/tmp", 0o1777)
    img.add_dir("/etc")
    img.add_data("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")

    users = [("root", 0, 0, "/root")]
    for u in a.user:
        parts = u.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"mkimage: --user NAME:UID:GID[:HOME]: {u!r}")
        users.append((parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else "/nonexistent"))
    passwd = "".join(f"{n}:x:{uid}:{gid}:{n}:{home}:/sbin/nologin\n" for n, uid, gid, home in users)
    groups = {}
    for n, _, gid, _ in users:
        groups.setdefault(gid, n)
    group = "".join(f"{n}:x:{gid}:\n" for gid, n in sorted(groups.items()))
    img.add_data("/etc/passwd", passwd.encode())
    img.add_data("/etc/group", group.encode())
    img.add_dir("/root", 0o700)

    for spec in a.file:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"mkimage: --file SRC:DEST[:MODE]: {spec!r}")
        img.add_file(parts[0], parts[1], int(parts[2], 8) if len(parts) == 3 else None)
    for spec in a.tree:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"mkimage: --tree SRC:DEST[:GLOB,...]: {spec!r}")
        img.add_tree(parts[0], parts[1], [g for g in (parts[2].split(",") if len(parts) == 3 else []) if g])
    for spec in a.dir:
        parts = spec.split(":")
        img.add_dir(parts[0], int(parts[1], 8) if len(parts) > 1 else 0o755)
    for spec in a.symlink:
        dest, target = split(spec, 2, "--symlink")
        img.add_symlink(dest, target)
    for spec in a.text:
        dest, mode, text = split(spec, 3, "--text")
        img.add_data(dest, text.replace("\\n", "\n").encode(), int(mode, 8))
    if a.ca_certs:
        img.add_file("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt", 0o644)
    if a.libs:
        img.add_libs()
    for spec in a.chown:
        dest, uid, gid = split(spec, 3, "--chown")
        img.chown(dest, int(uid), int(gid))

    out_dir = os.path.dirname(os.path.abspath(a.out))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mkimage.") as tmp:
        layer_path = os.path.join(tmp, "layer.tar")
        with open(layer_path, "wb") as f:
            layer_tar(img, f)
        layer_digest = sha256_file(layer_path)
        layer_size = os.path.getsize(layer_path)

        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        env += [e for e in a.env if not e.startswith("PATH=")]
        if any(e.startswith("PATH=") for e in a.env):
            env = [e for e in a.env if e.startswith("PATH=")][-1:] + env[1:]
        config = {"Env": env, "WorkingDir": a.workdir}
        if a.entrypoint:
            config["Entrypoint"] = json.loads(a.entrypoint)
        if a.cmd:
            config["Cmd"] = json.loads(a.cmd)
        if a.run_as:
            config["User"] = a.run_as
        if a.label:
            config["Labels"] = dict(kv.split("=", 1) for kv in a.label)
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_digest]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/node/mkimage.py"}],
        }
        cfg_bytes = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
        cfg_digest = hashlib.sha256(cfg_bytes).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + cfg_digest, "size": len(cfg_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": "sha256:" + layer_digest, "size": layer_size}],
        }
        man_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        man_digest = hashlib.sha256(man_bytes).hexdigest()
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + man_digest,
                "size": len(man_bytes),
                "annotations": {"io.containerd.image.name": a.ref, "org.opencontainers.image.ref.name": a.ref},
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        }

        tmp_out = os.path.join(tmp, "image.tar")
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as t:
            def add_bytes(name, data):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                t.addfile(ti, io.BytesIO(data))

            add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes("index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
            add_bytes(f"blobs/sha256/{cfg_digest}", cfg_bytes)
            add_bytes(f"blobs/sha256/{man_digest}", man_bytes)
            ti = tarfile.TarInfo(f"blobs/sha256/{layer_digest}")
            ti.size, ti.mtime, ti.mode = layer_size, 0, 0o644
            with open(layer_path, "rb") as f:
                t.addfile(ti, f)
        os.replace(tmp_out, a.out)
    print(f"{a.ref} sha256:{man_digest} {layer_size} bytes, {len(img.entries)} entries")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        sys.exit(1)
