"""Real writers into a real mount: ffmpeg's muxers, metaflac, mutagen, rsync, cp, and the way
Sonarr and Jellyfin write. Each runs the same command on a plain local directory too: the
mount must end up with the same bytes, byte for byte, and so must the vault after
`pqfs sync` (read from the store, not the mount) and a remount.

Every tool here is deterministic on its inputs (ffmpeg with +bitexact and no metadata: the
ffmpeg test checks that on two local runs first), so a difference is the mount's.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import mutagen.flac
import mutagen.id3
import mutagen.mp3
import pytest

from pqfs.vault.objects import open_reader
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, mount_stats, mounted, run_pqfs, tree_snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.media]

FAST = ("--commit-delay", "0.2")  # a closed file commits on its own, between a tool's steps
HOLD = ("--commit-delay", "3600")  # nothing commits before `pqfs sync`

VIDEO = ["-f", "lavfi", "-i", "testsrc=duration=3:size=320x240:rate=25"]
SINE = ["-f", "lavfi", "-i", "sine=frequency=440:duration=3"]
# film grain: a few MB of video, so that a file spans many 64 KiB chunks and spills to disk
GRAIN = ["-vf", "noise=alls=30:allf=t"]
H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-qp", "24", "-pix_fmt", "yuv420p"]
BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]
BITEXACT += ["-map_metadata", "-1"]


def noise(seconds: int) -> list[str]:
    """Stereo pink noise (seeded: the same samples every run): FLAC barely compresses it."""
    src = f"anoisesrc=d={seconds}:c=pink:r=44100:a=0.3:seed=7"
    return ["-f", "lavfi", "-i", src, "-ac", "2"]


MUXES: dict[str, list[str]] = {
    "clip.mp4": [*VIDEO, *SINE, *GRAIN, *H264, "-c:a", "aac"],  # mdat's size patched at the end
    "faststart.mp4": [*VIDEO, *SINE, *GRAIN, *H264, "-c:a", "aac", "-movflags", "+faststart"],
    "clip.mkv": [*VIDEO, *SINE, *GRAIN, *H264, "-c:a", "libvorbis"],  # seek head, cues, duration
    "noise.flac": [*noise(10), "-c:a", "flac"],  # STREAMINFO rewritten at the end
}


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    """Run a tool; its stdout. Fails the test with its stderr if it fails."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def ffmpeg(*args: str | Path) -> None:
    run("ffmpeg", "-v", "error", "-nostdin", "-y", *args)


@pytest.fixture
def vault_dir(tmp_path: Path, cli_env: dict[str, str]) -> Path:
    v = tmp_path / "vault"
    run_pqfs("init", str(v), env=cli_env)
    return v


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Media made once for the module: a 30 s noise FLAC (a few MB), an MP3 with no tag, a
    poster JPEG, an MKV."""
    src = tmp_path_factory.mktemp("sources")
    ffmpeg(*noise(30), "-c:a", "flac", *BITEXACT, src / "noise.flac")
    ffmpeg(*noise(10), "-c:a", "libmp3lame", "-b:a", "192k", *BITEXACT, "-id3v2_version", "0",
           "-write_xing", "0", src / "tone.mp3")  # fmt: skip
    ffmpeg(*VIDEO, "-frames:v", "1", "-q:v", "2", *BITEXACT, src / "poster.jpg")
    ffmpeg(*MUXES["clip.mkv"], *BITEXACT, src / "clip.mkv")
    assert (src / "noise.flac").stat().st_size > 3_000_000
    assert (src / "clip.mkv").stat().st_size > 1_500_000  # past the 1 MiB a file keeps in memory
    return src


# ------------------------------------------------------------------ checks ----


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(0, n, 4096) if a[i : i + 4096] != b[i : i + 4096]), n)


def assert_same_files(got: dict[str, bytes], want: dict[str, bytes], where: str) -> None:
    """The same paths with the same bytes; a failure names each file that differs, its sizes
    and the 4 KiB block where it starts to differ (not megabytes of repr)."""
    assert sorted(got) == sorted(want), f"{where}: other files"
    bad = {
        p: f"size {len(got[p])} (want {len(want[p])}), differs from ~{first_difference(got[p], want[p])}"
        for p in want
        if got[p] != want[p]
    }
    assert not bad, f"{where}: {bad}"


def store_files(v: Path) -> dict[str, bytes]:
    """Every file of the vault and its plaintext, read from the store (not the mount)."""
    vault = Vault.open(str(v))
    vault.unlock(PASSPHRASE)
    try:
        out = {}
        for e in vault.catalog().files():
            with open_reader(vault, e) as reader:
                out[e.path] = b"".join(bytes(p) for p in reader.iter_range(0, reader.size))
        return out
    finally:
        vault.lock()


def sync(mp: Path, env: dict[str, str]) -> None:
    """`pqfs sync`: then nothing is pending and no commit failed."""
    run_pqfs("sync", str(mp), env=env)
    s = mount_stats(mp, env)
    assert (s["pending_files"], s["pending_ops"], s["commit_failures"]) == (0, 0, 0), s


def assert_committed(
    vault_dir: Path, mp: Path, env: dict[str, str], want: dict[str, bytes]
) -> None:
    """After `pqfs sync`, the mount and the vault itself hold exactly `want`."""
    sync(mp, env)
    assert_same_files(tree_snapshot(mp), want, "the mount after pqfs sync")
    assert_same_files(store_files(vault_dir), want, "the vault after pqfs sync")


def assert_remounted(
    vault_dir: Path, tmp_path: Path, env: dict[str, str], want: dict[str, bytes]
) -> None:
    assert_same_files(store_files(vault_dir), want, "the vault after pqfs umount")
    with mounted(vault_dir, tmp_path / "mnt", env) as mp:
        assert_same_files(tree_snapshot(mp), want, "a new mount")


def top_atoms(data: bytes) -> list[bytes]:
    """The top-level atoms of an MP4, in order."""
    atoms, off = [], 0
    while off + 8 <= len(data):
        size = int.from_bytes(data[off : off + 4], "big")
        atoms.append(data[off + 4 : off + 8])
        off += size if size >= 8 else len(data)
    return atoms


# ------------------------------------------------------------------ ffmpeg ----


@pytest.mark.parametrize("name", list(MUXES))
def test_ffmpeg_muxes_the_same_bytes_into_the_mount(
    name: str, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A muxer writes, seeks back and patches what it wrote (sizes, an index, STREAMINFO);
    faststart reads the whole file back and rewrites it shifted. Through the mount it
    overwrites (O_TRUNC) a committed earlier version of the file."""
    args = [*MUXES[name], *BITEXACT]
    local, again = tmp_path / "local", tmp_path / "again"
    local.mkdir()
    again.mkdir()
    ffmpeg(*args, local / name)
    ffmpeg(*args, again / name)
    want = (local / name).read_bytes()
    assert (again / name).read_bytes() == want, "ffmpeg is not deterministic here"
    assert len(want) > 400_000
    if name.endswith(".mp4"):
        atoms = top_atoms(want)
        assert (atoms.index(b"moov") < atoms.index(b"mdat")) == (name == "faststart.mp4")
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        ffmpeg(*args, "-t", "1", mp / name)  # an earlier version, committed
        sync(mp, cli_env)
        assert (mp / name).read_bytes() != want
        ffmpeg(*args, mp / name)
        assert_same_files({name: (mp / name).read_bytes()}, {name: want}, "the mount at once")
        assert_committed(vault_dir, mp, cli_env, {name: want})
    assert run_pqfs("cat", str(vault_dir), name, env=cli_env).stdout == want
    assert_remounted(vault_dir, tmp_path, cli_env, {name: want})


def test_ffmpeg_remuxes_from_the_mount_into_the_mount(
    sources: Path, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """ffmpeg reads a file still staged (never committed) while it writes another beside it."""
    local = tmp_path / "local"
    (local / "in").mkdir(parents=True)
    remux = ["-c", "copy", *BITEXACT, "-movflags", "+faststart"]
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *HOLD) as mp:
        (mp / "in").mkdir()
        for root in (local, mp):
            shutil.copyfile(sources / "clip.mkv", root / "in" / "clip.mkv")
            ffmpeg("-i", root / "in" / "clip.mkv", *remux, root / "clip.mp4")
            ffmpeg("-i", root / "clip.mp4", "-vn", "-c:a", "flac", *BITEXACT, root / "audio.flac")
        assert mount_stats(mp, cli_env)["files_committed"] == 0
        want = tree_snapshot(local)
        assert_same_files(tree_snapshot(mp), want, "the mount before any commit")
        assert_committed(vault_dir, mp, cli_env, want)
    assert_remounted(vault_dir, tmp_path, cli_env, want)


# ------------------------------------------------------------------ tag editors ----


def test_metaflac_edits_in_place_and_by_rewrite(
    sources: Path, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """metaflac writes a small tag into the FLAC's padding in place (a patch of the first
    chunk of a committed file), and one too big for it into NAME.metadata_edit, renamed over
    the file; each step gives the same bytes as on a local copy."""
    local = tmp_path / "local"
    local.mkdir()
    steps: list[list[str]] = [
        ["--set-tag=ARTIST=x"],
        ["--remove-tag=ARTIST"],
        ["--set-tag=COMMENT=" + "y" * 20_000],  # past the 8 KiB of padding: a rewrite
        ["--remove-tag=COMMENT", "--set-tag=TITLE=t"],
        ["--set-tag=ARTIST=x", "--set-tag=ALBUM=a"],
    ]
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        for root in (local, mp):
            shutil.copyfile(sources / "noise.flac", root / "noise.flac")
        sync(mp, cli_env)
        for i, step in enumerate(steps):
            ino = (local / "noise.flac").stat().st_ino
            for root in (local, mp):
                run("metaflac", *step, root / "noise.flac")
            if "y" * 20_000 in step[0]:
                assert (local / "noise.flac").stat().st_ino != ino, "metaflac did not rewrite"
            want = tree_snapshot(local)
            assert_same_files(tree_snapshot(mp), want, f"the mount after metaflac {step[0][:20]}")
            if i % 2:
                sync(mp, cli_env)  # the next step edits a committed file, else a staged one
        assert want["noise.flac"] != (sources / "noise.flac").read_bytes()
        assert run("metaflac", "--export-tags-to=-", mp / "noise.flac").splitlines() == [
            "TITLE=t",
            "ARTIST=x",
            "ALBUM=a",
        ]
        run("flac", "-t", "-s", mp / "noise.flac")  # decodes, audio MD5 checked
        assert_committed(vault_dir, mp, cli_env, want)
    assert_remounted(vault_dir, tmp_path, cli_env, want)


def _flac_add(path: Path, jpg: bytes) -> None:
    f = mutagen.flac.FLAC(path)
    f["ARTIST"] = "x"
    f["COMMENT"] = "y" * 20_000  # past the padding: mutagen moves the audio in place
    pic = mutagen.flac.Picture()
    pic.type, pic.mime, pic.data = 3, "image/jpeg", jpg
    f.add_picture(pic)
    f.save()


def _flac_shrink(path: Path, jpg: bytes) -> None:
    f = mutagen.flac.FLAC(path)
    del f["COMMENT"]
    f.clear_pictures()
    f.save()


def _mp3_add(path: Path, jpg: bytes) -> None:
    tags = mutagen.id3.ID3()  # none yet: inserted at the front, the whole file moves
    tags.add(mutagen.id3.TIT2(encoding=3, text="Pilot"))
    tags.add(mutagen.id3.TPE1(encoding=3, text="x"))
    tags.add(mutagen.id3.APIC(encoding=3, mime="image/jpeg", type=3, desc="cover", data=jpg))
    tags.save(path)


def _mp3_retag(path: Path, jpg: bytes) -> None:
    f = mutagen.mp3.MP3(path)
    assert f.tags is not None
    f.tags.delall("APIC")
    f.tags.add(mutagen.id3.TIT2(encoding=3, text="Second title"))
    f.save()


MUTAGEN: list[tuple[str, Callable[[Path, bytes], None]]] = [
    ("noise.flac", _flac_add),
    ("tone.mp3", _mp3_add),
    ("noise.flac", _flac_shrink),
    ("tone.mp3", _mp3_retag),
]


def test_mutagen_edits_in_place(
    sources: Path, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """mutagen saves in place, moving the audio within the file (read a block, write it
    further on or back) when the tags outgrow or leave their room."""
    jpg = (sources / "poster.jpg").read_bytes()
    local = tmp_path / "local"
    local.mkdir()
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        for root in (local, mp):
            for name in ("noise.flac", "tone.mp3"):
                shutil.copyfile(sources / name, root / name)
        sync(mp, cli_env)
        for i, (name, edit) in enumerate(MUTAGEN):
            for root in (local, mp):
                edit(root / name, jpg)
            want = tree_snapshot(local)
            assert_same_files(tree_snapshot(mp), want, f"the mount after {edit.__name__}")
            if i == 1:
                sync(mp, cli_env)
        for name in ("noise.flac", "tone.mp3"):
            assert want[name] != (sources / name).read_bytes()
        flac = mutagen.flac.FLAC(mp / "noise.flac")
        assert flac["ARTIST"] == ["x"] and "COMMENT" not in flac and not flac.pictures
        mp3 = mutagen.mp3.MP3(mp / "tone.mp3")
        assert mp3.tags is not None and str(mp3.tags["TIT2"]) == "Second title"
        assert abs(mp3.info.length - 10.0) < 0.1
        assert_committed(vault_dir, mp, cli_env, want)
    assert_remounted(vault_dir, tmp_path, cli_env, want)


# ------------------------------------------------------------------ copies ----


def make_tree(root: Path, sources: Path) -> None:
    rng = random.Random(11)
    season = root / "Show" / "Season 01"
    season.mkdir(parents=True)
    (root / "Show" / "Extras").mkdir()
    (root / "Show" / "empty dir").mkdir()
    shutil.copyfile(sources / "clip.mkv", season / "Show - S01E01.mkv")
    (season / "Show - S01E01.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHello\n")
    (season / "Show - S01E01.nfo").write_text("<episodedetails/>\n")
    (root / "Show" / "tvshow.nfo").write_text("<tvshow><title>Show</title></tvshow>\n")
    shutil.copyfile(sources / "poster.jpg", root / "Show" / "poster.jpg")
    (root / "Show" / "Extras" / "empty.txt").write_bytes(b"")
    (root / "Show" / "Extras" / "bonus é 1.bin").write_bytes(rng.randbytes(200_000))
    (root / "Show" / "fetch.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "Show" / "fetch.sh", 0o755)
    os.chmod(season / "Show - S01E01.nfo", 0o600)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):  # files before their dirs
        t = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(p, ns=(t, t))


def meta(root: Path) -> dict[str, tuple[int, int, int]]:
    """Mode, size and mtime (ns) of every file under root."""
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def diff_r(a: Path, b: Path) -> None:
    proc = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def rsync_changes(src: Path, dst: Path, *extra: str) -> list[str]:
    """What `rsync -a` would change (-n: nothing done), one itemized line a file or directory
    (a directory's mtime and mode count too)."""
    return run("rsync", "-a", "-n", "-i", *extra, f"{src}/", f"{dst}/").splitlines()


def test_rsync_and_cp_copy_trees(
    sources: Path, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """rsync writes each file to .NAME.XXXXXX, sets its mode and mtime, renames it into
    place; cp -r writes in place. Both trees are what they copied, empty directories too."""
    src, local = tmp_path / "src", tmp_path / "local"
    make_tree(src, sources)
    local.mkdir()
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        for root in (local, mp):
            run("rsync", "-a", f"{src}/", f"{root}/rsync/")
        diff_r(src, mp / "rsync")
        assert meta(mp / "rsync") == meta(src)
        assert rsync_changes(src, mp / "rsync") == []  # up to date: sizes and mtimes kept
        # a change, a new file, a file gone: rsync replaces, adds and deletes
        srt = src / "Show" / "Season 01" / "Show - S01E01.srt"
        srt.write_text("1\n00:00:01,000 --> 00:00:03,000\nHello again, longer\n")
        (src / "Show" / "Season 01" / "Show - S01E02.srt").write_text("2\n")
        (src / "Show" / "Extras" / "empty.txt").unlink()
        assert rsync_changes(src, mp / "rsync", "--delete") == [
            "*deleting   Show/Extras/empty.txt",
            ".d..t...... Show/Extras/",
            ".d..t...... Show/Season 01/",
            ">f.st...... Show/Season 01/Show - S01E01.srt",
            ">f+++++++++ Show/Season 01/Show - S01E02.srt",
        ]
        for root in (local, mp):
            run("rsync", "-a", "--delete", f"{src}/", f"{root}/rsync/")
            run("cp", "-r", src, root / "cp")
        diff_r(src, mp / "rsync")
        diff_r(src, mp / "cp")
        assert (mp / "cp" / "Show" / "empty dir").is_dir()
        assert meta(mp / "rsync") == meta(src)
        assert rsync_changes(src, mp / "rsync", "--delete") == []
        want = tree_snapshot(local)
        assert_same_files(tree_snapshot(mp), want, "the mount")
        assert_committed(vault_dir, mp, cli_env, want)
    assert_remounted(vault_dir, tmp_path, cli_env, want)
    with mounted(vault_dir, tmp_path / "mnt", cli_env) as mp:
        diff_r(src, mp / "rsync")
        diff_r(src, mp / "cp")
        assert (mp / "rsync" / "Show" / "empty dir").is_dir()
        assert meta(mp / "rsync") == meta(src)
        assert rsync_changes(src, mp / "rsync", "--delete") == []


# ------------------------------------------------------------------ media managers ----


def sonarr_import(src: Path, dest: Path) -> None:
    """Sonarr's import: copy to DEST.partial~, check the copy's size, rename it into place."""
    partial = dest.with_name(dest.name + ".partial~")
    shutil.copyfile(src, partial)
    assert os.stat(partial).st_size == os.stat(src).st_size
    os.rename(partial, dest)


def test_sonarr_copies_to_partial_then_renames(
    sources: Path, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A new episode, imported at once; an upgrade over an episode in the vault, its
    .partial~ committed before the rename. No .partial~ is left anywhere."""
    season = Path("TV", "Show", "Season 01")
    e01 = season / "Show - S01E01 - Pilot.mkv"
    e02 = season / "Show - S01E02 - Second.mkv"
    clip = (sources / "clip.mkv").read_bytes()
    old = random.Random(12).randbytes(700_000)  # the version the upgrade replaces
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *FAST) as mp:
        (mp / season).mkdir(parents=True)
        (mp / e02).write_bytes(old)
        sync(mp, cli_env)
        sonarr_import(sources / "clip.mkv", mp / e01)
        assert (mp / e01).read_bytes() == clip
        # the upgrade: its .partial~ is in the vault when it is renamed over the old file
        partial = mp / e02.with_name(e02.name + ".partial~")
        shutil.copyfile(sources / "clip.mkv", partial)
        sync(mp, cli_env)
        assert run_pqfs("cat", str(vault_dir), str(e02) + ".partial~", env=cli_env).stdout == clip
        assert os.stat(partial).st_size == len(clip)
        os.rename(partial, mp / e02)
        assert (mp / e02).read_bytes() == clip
        assert sorted(os.listdir(mp / season)) == sorted([e01.name, e02.name])
        want = {str(e01): clip, str(e02): clip}
        assert_committed(vault_dir, mp, cli_env, want)
    assert_remounted(vault_dir, tmp_path, cli_env, want)
    with mounted(vault_dir, tmp_path / "mnt", cli_env) as mp:
        assert not [p for p in mp.rglob("*") if p.name.endswith(".partial~")]


def write_truncating(path: Path, data: bytes, block: int = 81_920) -> None:
    """As .NET's FileMode.Create writes: O_CREAT|O_TRUNC, then its buffer's worth at a time."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), block):
            os.write(fd, data[off : off + block])
    finally:
        os.close(fd)


def test_jellyfin_rewrites_nfo_and_writes_images_and_subtitles(
    sources: Path, vault_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Beside a movie already in the vault: its .nfo rewritten over itself several times
    (longer, shorter), a poster and a subtitle; each reads back at once after close, before
    any commit (the vault still has the old .nfo), and all of it after pqfs sync."""
    movie = tmp_path / "lib" / "Film (2020)"
    movie.mkdir(parents=True)
    shutil.copyfile(sources / "clip.mkv", movie / "Film (2020).mkv")
    old_nfo = b"<movie><title>Film</title><plot>" + b"old plot " * 2000 + b"</plot></movie>\n"
    (movie / "Film (2020).nfo").write_bytes(old_nfo)
    run_pqfs("add", str(vault_dir), str(tmp_path / "lib"), "Movies", env=cli_env)
    d = Path("Movies", "Film (2020)")
    nfo = d / "Film (2020).nfo"
    jpg = (sources / "poster.jpg").read_bytes()
    srt = "1\n00:00:00,500 --> 00:00:02,000\nÇa tourne.\n\n2\n00:00:02,500 --> 00:00:03,000\n…\n"
    versions = [
        b"<movie><title>Film</title><plot>" + b"new, longer plot " * 2000 + b"</plot></movie>\n",
        b"<movie><title>Film</title></movie>\n",  # shorter: nothing of the last one may stay
        b"<movie><title>Film</title><year>2020</year></movie>\n",
    ]
    with mounted(vault_dir, tmp_path / "mnt", cli_env, *HOLD) as mp:
        assert (mp / nfo).read_bytes() == old_nfo
        for v in versions:
            write_truncating(mp / nfo, v)
            assert (mp / nfo).read_bytes() == v
            assert os.stat(mp / nfo).st_size == len(v)
        write_truncating(mp / d / "Film (2020)-poster.jpg", jpg)
        assert (mp / d / "Film (2020)-poster.jpg").read_bytes() == jpg
        write_truncating(mp / d / "Film (2020).fr.srt", srt.encode())
        assert (mp / d / "Film (2020).fr.srt").read_text() == srt
        # all of it still staged: the vault has the old .nfo and neither new file
        assert mount_stats(mp, cli_env)["pending_files"] == 3
        assert run_pqfs("cat", str(vault_dir), str(nfo), env=cli_env).stdout == old_nfo
        assert (mp / d / "Film (2020).mkv").read_bytes() == (sources / "clip.mkv").read_bytes()
        want = {
            str(d / "Film (2020).mkv"): (sources / "clip.mkv").read_bytes(),
            str(nfo): versions[-1],
            str(d / "Film (2020)-poster.jpg"): jpg,
            str(d / "Film (2020).fr.srt"): srt.encode(),
        }
        assert_committed(vault_dir, mp, cli_env, want)
    assert_remounted(vault_dir, tmp_path, cli_env, want)
