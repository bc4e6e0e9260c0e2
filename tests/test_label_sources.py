"""Listing and archive streaming for `imgjobs label` (no Ray needed)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest

from pipeline.errors import UsageError
from pipeline.formats.keys import Reader
from pipeline.label.evaluate import true_classes
from pipeline.label.sources import list_inputs
from tests.helpers import FlakyProxy


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_walk_finds_images_case_insensitively_and_skips_hidden_and_other_files(tmp_path):
    for name in ("a/one.JPG", "a/b/two.jpeg", "three.PnG", "c/four.webp", "c/five.TIFF", "six.gif", "seven.bmp"):
        touch(tmp_path / name)
    for name in ("notes.txt", "a/.hidden.jpg", ".cache/x.jpg", "a/model.pt", "noext"):
        touch(tmp_path / name)
    (tmp_path / "folder.jpg").mkdir()  # a folder named like an image is searched, never read as an image
    touch(tmp_path / "folder.jpg" / "inner.png")
    listing = list_inputs([str(tmp_path)])
    rel = sorted(os.path.relpath(k, tmp_path) for k in listing.files.to_pylist())
    assert rel == sorted(["a/one.JPG", "a/b/two.jpeg", "three.PnG", "c/four.webp", "c/five.TIFF", "six.gif",
                          "seven.bmp", "folder.jpg/inner.png"])
    assert listing.roots == [str(tmp_path)]


def test_symlink_loops_do_not_hang_and_broken_links_are_kept(tmp_path):
    touch(tmp_path / "d" / "a.jpg")
    (tmp_path / "d" / "loop").symlink_to(tmp_path)  # would recurse forever if followed
    (tmp_path / "d" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    listing = list_inputs([str(tmp_path)])
    assert sorted(os.path.basename(k) for k in listing.files.to_pylist()) == ["a.jpg", "gone.jpg"]


def test_manifest_relative_lines_comments_and_duplicates_across_inputs(tmp_path):
    a = touch(tmp_path / "imgs" / "a.jpg")
    touch(tmp_path / "imgs" / "b.jpg")
    manifest = tmp_path / "lists" / "m.txt"
    manifest.parent.mkdir()
    manifest.write_text(f"# a comment\n../imgs/a.jpg\n\n{tmp_path}/imgs/b.jpg\n../imgs/missing.jpg\nshards.tar.gz\n")
    listing = list_inputs([str(manifest), str(tmp_path / "imgs"), str(a)])
    imgs = tmp_path / "imgs"
    assert listing.files.to_pylist() == [str(a), str(imgs / "b.jpg"), str(imgs / "missing.jpg")]
    assert listing.archives.to_pylist() == [str(tmp_path / "lists" / "shards.tar.gz")]


def test_file_uri_inputs_keep_uri_keys(tmp_path):
    touch(tmp_path / "x" / "a.jpg", b"abc")
    listing = list_inputs([f"file://{tmp_path}/x"])
    assert listing.files.to_pylist() == [f"file://{tmp_path}/x/a.jpg"]
    assert Reader().read(listing.files[0].as_py()) == b"abc"


@pytest.mark.parametrize("bad, message", [("missing-dir", "not found"), ("data.csv", "is not an image, archive")])
def test_bad_inputs_are_usage_errors_before_any_listing(tmp_path, bad, message):
    touch(tmp_path / "data.csv")
    with pytest.raises(UsageError, match=message):
        list_inputs([str(tmp_path), str(tmp_path / bad)])


def make_tar(path, members: dict, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path, members: dict):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("kind, uri", [("tar", False), ("tar.gz", False), ("tgz", True), ("zip", False), ("zip", True)])
def test_archives_stream_members_without_extracting_and_skip_done_ones(tmp_path, kind, uri):
    members = {"a/1.jpg": b"1", "../../evil.jpg": b"2", "/abs/3.PNG": b"3", "readme.txt": b"no", "a/._mac.jpg": b"no"}
    path = tmp_path / f"shard.{kind}"
    if kind == "zip":
        make_zip(path, members)
    else:
        make_tar(path, members, "w" if kind == "tar" else "w:gz")
    key = f"file://{path}" if uri else str(path)
    done = {f"{key}!a/1.jpg"}
    got = {k: data for k, data, _, _ in Reader().archive_members(key, done)}
    assert got == {f"{key}!../../evil.jpg": b"2", f"{key}!/abs/3.PNG": b"3"}
    assert done == {f"{key}!a/1.jpg"}  # the caller's set, as it gave it
    assert sorted(os.listdir(tmp_path)) == [path.name]  # nothing was written next to (or above) the archive
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_a_truncated_archive_yields_its_members_then_one_error_row(tmp_path):
    data = make_tar(tmp_path / "s.tar.gz", {f"{i}.jpg": os.urandom(20000) for i in range(5)}).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    rows = list(Reader().archive_members(str(cut), set()))
    whole = [row for row in rows[:-1] if row.error is None]
    assert 1 <= len(whole) < 5 and len(rows) - 1 - len(whole) <= 1  # the member the cut falls in gets its own row
    assert rows[-1][0] == str(cut) and rows[-1][1] is None and rows[-1][2].startswith("unreadable archive:")
    assert rows[-1][3] == "decode"  # the bytes are bad: a rerun would read the same


def test_a_folder_of_shards_lists_its_archives_beside_its_images(tmp_path):
    shards = tmp_path / "shards"
    for name in ("000000.tar", "000001.tar.gz", "more/000002.zip", "loose.jpg", "notes.txt", ".hidden.tar"):
        touch(shards / name)
    listing = list_inputs([str(shards)])
    assert listing.archives.to_pylist() == [str(shards / n) for n in ("000000.tar", "000001.tar.gz", "more/000002.zip")]
    assert listing.files.to_pylist() == [str(shards / "loose.jpg")] and listing.roots == [str(shards)]


def test_a_brace_range_names_shards_without_looking_them_up_and_a_glob_matches_one_folder(tmp_path):
    for name in ("000.tar", "001.tar", "003.tar", "sub/004.tar", "005.zip"):
        touch(tmp_path / "s" / name)
    ranged = list_inputs([f"{tmp_path}/s/{{000..003}}.tar"])
    # 002 is missing: an error row
    assert ranged.archives.to_pylist() == [str(tmp_path / "s" / f"{i:03d}.tar") for i in range(4)]
    globbed = list_inputs([f"{tmp_path}/s/*.tar", f"{tmp_path}/s/*/*.tar", f"{tmp_path}/s/0*"])
    assert globbed.archives.to_pylist() == [str(tmp_path / "s" / n) for n in ("000.tar", "001.tar", "003.tar",
                                                                              "005.zip", "sub/004.tar")]
    with pytest.raises(UsageError, match=r"input .*/s/\*\.tgz matches no image or archive"):
        list_inputs([f"{tmp_path}/s/*.tgz"])
    with pytest.raises(UsageError, match=r"names .*/s/1\.csv, which is not an image or an archive"):
        list_inputs([f"{tmp_path}/s/{{1..2}}.csv"])


def test_a_glob_over_shards_on_s3_costs_a_listing_not_a_request_per_shard(s3_server, tmp_path):
    fs = s3_server.filesystem()
    for i in range(40):
        with fs.open_output_stream(f"data/globbed/{i:06d}.tar") as f:
            f.write(b"x")
    proxy = FlakyProxy(s3_server.endpoint, down_for=0.0)
    try:
        listing = list_inputs([f"s3://data/globbed/*.tar?endpoint_override={proxy.endpoint}&scheme=http"])
    finally:
        proxy.stop()
    assert listing.archives.to_pylist() == [f"s3://data/globbed/{i:06d}.tar" for i in range(40)]  # clean keys: no query
    assert len(proxy.requests) <= 3, proxy.requests  # a listing of the prefix, not 40 lookups


@pytest.mark.parametrize("inputs", [[], ["empty"], ["empty", "notes"]])
def test_inputs_that_list_nothing_to_label_are_a_usage_error(tmp_path, inputs):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "notes" / "readme.txt")
    with pytest.raises(UsageError, match="nothing to label in .*: no image .* or archive"):
        list_inputs([str(tmp_path / name) for name in inputs or ["empty"]])


def test_archive_members_take_their_class_from_their_own_folder_or_the_archive_s():
    paths = ["/d/ants/a.jpg", "/d/bees/s.tar!x.jpg", "/d/s.tar!ants/1.jpg", "/d/s.tar!x/1.jpg",
             "/d/bees/s.tar!ants/1.jpg", "/elsewhere/ants/a.jpg", "/d/ants"]
    assert true_classes(paths, ["/d"], ["ants", "bees"]).tolist() == [0, 1, 0, -1, 0, -1, -1]
