"""issue 33: credentials in a URI are refused with one line that shows them masked, before anything is written or
submitted; and a manifest line cannot change the options (the endpoint) of a bucket that the command line named."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from jobs.cli import main
from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.keys import Reader
from pipeline.label.sources import list_inputs
from tests.helpers import FlakyProxy, make_image_folder, write_config

KEY, SECRET = "AKIAIMGJOBSEXAMPLE", "wJalrXUtnFEMIK7MDENGbPxRfiCY"
# AWS secrets may hold a "/", which users paste unescaped: the URI's authority then ends inside the secret.
SLASHED = "wJalrXUtnFEMI/K7MDENGbPxRfiCY"


def assert_refused(code: int, out: str, err: str, shown: str) -> None:
    """Exit 2, one line on stderr showing the URI masked and where credentials belong, and no trace of the secret."""
    assert code == 2, out + err
    assert err.count("\n") == 1 and shown in err and "AWS_ACCESS_KEY_ID" in err, err
    for secret in (KEY, SECRET, *SLASHED.split("/")):
        assert secret not in out + err


@pytest.mark.parametrize("uri, shown", [
    (f"s3://{KEY}:{SECRET}@data/x.jpg", "s3://***@data/x.jpg"),
    (f"s3://{KEY}:{SLASHED}@data/x.jpg?scheme=http", "s3://***@data/x.jpg?scheme=http"),
    (f"s3://{KEY}:{SLASHED.replace('/', '%2F')}@data/x.jpg", "s3://***@data/x.jpg"),
    (f"s3://{KEY}@data/x.jpg", "s3://***@data/x.jpg"),  # pyarrow takes a lone user name as the access key
    (f"gs://user:{SECRET}@bucket/me@2x.png", "gs://***@bucket/me@2x.png"),
    (f"hdfs://user:{SECRET}@namenode:8020/x", "hdfs://***@namenode:8020/x"),
])
def test_a_uri_with_credentials_is_refused_masked(uri, shown):
    with pytest.raises(UsageError) as refused:
        storage.refuse_credentials(uri, "--input")
    assert_refused(2, "", str(refused.value) + "\n", f"--input {shown} carries credentials")


@pytest.mark.parametrize("uri", ["s3://bucket/photos/me@2x.jpg", "hdfs://user@namenode:8020/x",
                                 "hdfs://namenode:8020/dir/me@2x.jpg", "/home/me/a@b.jpg",
                                 "s3://bucket/x.jpg?endpoint_override=127.0.0.1:9000&scheme=http"])
def test_uris_without_credentials_pass(uri):
    storage.refuse_credentials(uri, "--input")


@pytest.fixture
def label_inputs(tmp_path, s3_server):
    """A local image folder, and the same images with a manifest on the S3 server."""
    images = make_image_folder(tmp_path / "imgs", train_per_class=2, val_per_class=0)
    s3_server.upload(images, "data/creds")
    return images


@pytest.mark.parametrize("case", ["input", "pattern", "checkpoint", "output", "manifest", "manifest-slashed"])
def test_labeling_refuses_credentials_and_writes_nothing(case, label_inputs, small_checkpoint, s3_server, tmp_path,
                                                         capfd):
    fs, query = s3_server.filesystem(), f"?endpoint_override={s3_server.endpoint}&scheme=http"
    secret = SLASHED if case == "manifest-slashed" else SECRET
    with_secret = f"s3://{KEY}:{secret}@"
    args = {"--checkpoint": small_checkpoint, "--input": str(label_inputs), "--output": str(tmp_path / "out")}
    shown = "s3://***@"
    if case == "input":
        args["--input"], shown = f"{with_secret}data/creds/train/red/red_000.jpg{query}", "--input s3://***@data/creds/"
    elif case == "pattern":
        args["--input"] = f"{with_secret}data/creds/train/red/red_00{{0..1}}.jpg{query}"
    elif case == "checkpoint":
        args["--checkpoint"] = f"{with_secret}runs/creds/checkpoint.pt{query}"
    elif case == "output":
        args["--output"], shown = f"{with_secret}labels/creds{query}", f"--output s3://***@labels/creds{query}"
    else:
        lines = ["# made by hand", "train/red/red_000.jpg", f"{with_secret}data/creds/train/red/red_001.jpg"]
        with fs.open_output_stream("data/creds/m.txt") as f:
            f.write("\n".join(lines).encode())
        args["--input"] = f"s3://data/creds/m.txt{query}"
        shown = "manifest s3://data/creds/m.txt line 3: s3://***@data/creds/train/red/red_001.jpg carries"
    code = main(["label", *[part for pair in args.items() for part in pair]])
    out, err = capfd.readouterr()
    assert_refused(code, out, err, shown)
    assert not (tmp_path / "out").exists()  # no Parquet, no _summary.json, no lock
    assert not fs.get_file_info(pafs.FileSelector("labels/creds", recursive=True, allow_not_found=True))


def test_training_refuses_credentials_in_data_root_and_storage_path(tiny_folder, tmp_path, capfd):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", "creds", tiny_folder, runs)
    for override, shown in ((f"data.root=s3://{KEY}:{SECRET}@data/creds", "data.root s3://***@data/creds"),
                            (f"storage.path=s3://{KEY}:{SLASHED}@runs", "storage.path s3://***@runs")):
        code = main(["train", "-c", str(config), override])
        assert_refused(code, *capfd.readouterr(), f"config error: {shown} carries credentials")
    # In the file itself, as well as in an override.
    raw = json.loads(config.read_text())
    raw["data"]["root"] = f"s3://{KEY}:{SECRET}@data/creds?scheme=http"
    config.write_text(json.dumps(raw))
    assert_refused(main(["train", "-c", str(config)]), *capfd.readouterr(), "s3://***@data/creds?scheme=http")
    assert not runs.exists()  # no run folder, no config.json


@pytest.mark.parametrize("job", [
    ["label", "--checkpoint", "runs/x", "--input", f"s3://{KEY}:{SECRET}@data/x.jpg", "--output", "out"],
    ["label", "--checkpoint", "runs/x", f"--input=s3://{KEY}:{SLASHED}@data/x.jpg", "--output", "out"],
    ["train", "-c", "configs/demo.yaml", f"storage.path=s3://{KEY}:{SECRET}@runs"],
])
def test_submit_refuses_credentials_before_it_contacts_the_cluster(job, capfd):
    """The job's arguments become its entrypoint and metadata on the cluster. Port 9 has no dashboard: had the
    command got that far, its error would be another."""
    code = main(["submit", "--address", "http://127.0.0.1:9", "--", *job])
    out, err = capfd.readouterr()
    assert_refused(code, out, err, "s3://***@")
    assert "error: argument " in err and "no Ray dashboard" not in err


@pytest.fixture
def endpoints(s3_server):
    """Two endpoints in front of the same S3 server, each recording the requests it gets: the command line's and
    another one."""
    mine, other = FlakyProxy(s3_server.endpoint, down_for=0.0), FlakyProxy(s3_server.endpoint, down_for=0.0)
    yield mine, other
    mine.stop()
    other.stop()


def test_a_manifest_line_cannot_change_the_endpoint_the_command_line_gave(s3_server, endpoints, tmp_path):
    mine, other = endpoints
    fs = s3_server.filesystem()
    for i in range(4):
        with fs.open_output_stream(f"data/opts/{i}.jpg") as f:
            f.write(b"image %d" % i)
    query = f"?endpoint_override={mine.endpoint}&scheme=http"
    lines = ["# the command line's bucket, with no options of its own: it keeps the command line's",
             "s3://data/opts/2.jpg",
             f"s3://data/opts/3.jpg?scheme=http&endpoint_override={mine.endpoint}"]  # the same options, reordered
    with fs.open_output_stream("data/opts/good.txt") as f:
        f.write("\n".join(lines).encode())
    with fs.open_output_stream("data/opts/bad.txt") as f:
        f.write("\n".join([*lines, f"s3://data/opts/x.jpg?endpoint_override={other.endpoint}&scheme=http"]).encode())
    command_line = f"s3://data/opts/{{0..1}}.jpg{query}"

    with pytest.raises(UsageError) as refused:
        list_inputs([command_line, f"s3://data/opts/bad.txt{query}"])
    message = str(refused.value)
    assert message.startswith("manifest s3://data/opts/bad.txt line 4 sets options (endpoint_override, scheme) for "
                              "s3://data that differ from those input s3://data/opts/0.jpg set"), message
    assert other.endpoint not in message and "\n" not in message  # option names, not their values
    assert not other.requests

    listing = list_inputs([command_line, f"s3://data/opts/good.txt{query}"])
    keys = listing.files.to_pylist()
    assert keys == [f"s3://data/opts/{i}.jpg" for i in range(4)]
    reader = Reader(listing.options)
    assert [reader.read(key) for key in keys] == [b"image %d" % i for i in range(4)]
    read = [path.split("?")[0] for method, path in mine.requests if method == "GET" and path.endswith(".jpg")]
    assert sorted(set(read)) == [f"/data/opts/{i}.jpg" for i in range(4)]  # every image from the command line's
    assert not other.requests


def test_a_line_cannot_give_options_to_a_bucket_named_without_them(tmp_path):
    """Nor can one input change another's; no request is made (brace ranges are not looked up)."""
    manifest = tmp_path / "m.txt"
    manifest.write_text("s3://data/opts/x.jpg?endpoint_override=elsewhere:9000\n")
    with pytest.raises(UsageError, match=r"line 1 sets options \(endpoint_override\) for s3://data that differ from "
                                         r"those input s3://data/opts/0\.jpg set \(none\)"):
        list_inputs(["s3://data/opts/{0..1}.jpg", str(manifest)])
    with pytest.raises(UsageError, match=r"^input s3://data/b/0\.jpg sets options \(scheme\) for s3://data"):
        list_inputs(["s3://data/a/{0..1}.jpg?scheme=http", "s3://data/b/{0..1}.jpg?scheme=https"])
