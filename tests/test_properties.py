"""
Properties over many generated requests, each checked against a simple
model written here: the router's status and error code for any path, and
the exact bytes of any Range answer.
"""

import hashlib
import json
import os
import re
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from .support import InMemoryServer, makeBlobDir, sha256

BLOB = os.urandom(70000)
HEX = sha256(BLOB)
HEX512 = hashlib.sha512(BLOB).hexdigest()
ABSENT = "0" * 64


def blobDir(testCase) -> str:
    blobsdir = makeBlobDir(testCase, [BLOB])
    os.makedirs(os.path.join(blobsdir, "blobs", "sha512"))
    with open(os.path.join(blobsdir, "blobs", "sha512", HEX512), "wb") as f:
        f.write(BLOB)
    return blobsdir


# The router's rules, restated.

_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789")


def validComponent(component: bytes) -> bool:
    """
    Runs of lowercase letters and digits, joined by one of: a dot, one or
    two underscores, or any number of dashes.
    """
    runs = re.split(rb"([^a-z0-9]+)", component)
    words, separators = runs[0::2], runs[1::2]
    if not all(words) or not all(set(word) <= _ALNUM for word in words):
        return False
    return all(
        sep in (b".", b"_", b"__") or set(sep) == {ord("-")} for sep in separators
    )


def validName(components: list[bytes]) -> bool:
    return len(b"/".join(components)) <= 255 and all(map(validComponent, components))


def existingBlob(reference: bytes) -> bool | None:
    """
    Whether a digest names the blob, names none, or is no digest (None).
    """
    algorithm, colon, hexdigest = reference.decode("latin-1").rpartition(":")
    if not colon:
        algorithm = "bare"
    lengths = {"sha256": 64, "sha512": 128, "bare": 64}
    if algorithm not in lengths or len(hexdigest) != lengths[algorithm]:
        return None
    if set(hexdigest) - set("0123456789abcdef"):
        return None
    return hexdigest == (HEX512 if algorithm == "sha512" else HEX)


def expected(method: bytes, segments: list[bytes]) -> tuple[int, str | None, bool]:
    """
    The status, the OCI error code (None when not an error), and whether
    the answer is the blob, for a request.
    """
    read = method in (b"GET", b"HEAD")
    v2 = segments[:1] == [b"v2"]
    rest = segments[1:] if v2 else segments
    if v2 and rest in ([], [b""]):
        return (200, None, False) if read else (405, "UNSUPPORTED", False)
    if len(rest) > 2 and rest[-2] == b"blobs":
        if not read:
            return 405, "UNSUPPORTED", False
        if not validName(rest[:-2]):
            return 400, "NAME_INVALID", False
        found = existingBlob(rest[-1])
        if found is None:
            return 400, "DIGEST_INVALID", False
        return (200, None, True) if found else (404, "BLOB_UNKNOWN", False)
    if v2 and not read:
        return 405, "UNSUPPORTED", False
    if v2 and len(rest) > 2 and rest[-2] == b"manifests":
        return 404, "MANIFEST_UNKNOWN", False
    return 404, "NAME_UNKNOWN", False


goodNames = st.sampled_from(
    ["library", "ubuntu", "a", "my-repo.x__y", "a--b", "x" * 255, "n" * 127, "m" * 128]
)
badNames = st.sampled_from(
    ["Library", "a_", "-a", "a___b", "..", ".", "", "%2F", "a%2Fb", "%2e%2e", "%00",
     "y" * 300, "v2", "V2", "blobs"]
)
goodReferences = st.sampled_from(["sha256:" + HEX, HEX, "sha512:" + HEX512, "sha256:" + ABSENT, ABSENT])
badReferences = st.sampled_from(
    ["sha256:" + HEX.upper(), HEX.upper(), "sha256:" + HEX[:-1], "sha512:" + HEX,
     "md5:" + HEX[:32], "sha256:", "latest", "", "..", "%2F" + HEX]
)
noise = st.text(alphabet="abcAZ09-_.:%~+", max_size=12)


def weighted(*choices):
    """
    One of the strategies, each drawn as often as its weight says.
    """
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(table.__getitem__)


# Mostly the shape of a blob path, with some of its parts replaced; some
# paths of anything at all.
shaped = st.builds(
    lambda v2, name, kind, reference: v2 + name + [kind, reference],
    st.sampled_from([["v2"], ["v2"], []]),
    st.lists(weighted((8, goodNames), (2, badNames), (1, noise)), max_size=4),
    st.sampled_from(["blobs", "blobs", "blobs", "blobs", "manifests", "Blobs", ""]),
    weighted((4, goodReferences), (3, badReferences), (1, noise)),
)
segment = st.one_of(goodNames, badNames, goodReferences, badReferences, noise)
paths = weighted((3, shaped), (1, st.lists(segment, max_size=8)))
methods = st.sampled_from([b"GET", b"GET", b"GET", b"HEAD", b"HEAD", b"POST", b"DELETE", b"OPTIONS"])


class RouterModelTests(SynchronousTestCase):
    def setUp(self):
        self.server = InMemoryServer(blobDir(self))

    @settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=methods, segments=paths)
    def test_agreesWithModel(self, method, segments):
        """
        Any path of names, digests, dot segments, encoded slashes, empty,
        upper-case and over-long segments gets the model's status and
        error code, never a 500; a blob answer carries the blob.
        """
        url = ("/" + "/".join(segments)).encode()
        response = self.server.get(url, method=method)
        decoded = [unquote_to_bytes(s) for s in url[1:].split(b"/")]
        status, code, isBlob = expected(method, decoded)
        self.assertEqual(response.status, status, url)
        contentType = "application/octet-stream" if isBlob else "application/json"
        self.assertEqual(response.header("content-type"), contentType, url)
        if code is not None and method != b"HEAD":
            self.assertEqual(json.loads(response.body)["errors"][0]["code"], code, url)
        if isBlob:
            self.assertEqual(response.header("content-length"), str(len(BLOB)))
            self.assertEqual(response.body, b"" if method == b"HEAD" else BLOB)


# Range headers, and the bytes they select, restated.

def spec(limit):
    # Anywhere, near the start, or near the end: ranges that touch, overlap
    # or pass the end are common.
    position = st.one_of(
        st.integers(min_value=0, max_value=limit),
        st.integers(min_value=0, max_value=min(limit, 40)),
        st.integers(min_value=max(limit - 40, 0), max_value=limit),
    )
    return st.one_of(
        st.tuples(position, position).map(lambda t: ("closed", min(t), max(t))),
        position.map(lambda first: ("from", first, None)),
        position.map(lambda n: ("suffix", None, n)),
    )


def tiling(limit):
    """
    Closed ranges that touch end to end, in any order.
    """
    cuts = st.lists(st.integers(min_value=0, max_value=limit), min_size=3, max_size=5, unique=True)
    return cuts.map(sorted).flatmap(
        lambda cuts: st.permutations([("closed", a, b - 1) for a, b in zip(cuts, cuts[1:])])
    )


def specLists(limit):
    return st.one_of(st.lists(spec(limit), min_size=1, max_size=6), tiling(limit))


def render(specs) -> bytes:
    text = []
    for kind, first, last in specs:
        if kind == "closed":
            text.append(f"{first}-{last}")
        elif kind == "from":
            text.append(f"{first}-")
        else:
            text.append(f"-{last}")
    return ("bytes=" + ",".join(text)).encode()


def selected(specs, size: int, maxRanges: int):
    """
    None for the whole blob with 200; else the (start, end) slices to send,
    sorted, overlapping or touching ones joined; [] for 416.
    """
    if len(specs) > maxRanges:
        return None
    slices = []
    for kind, first, last in specs:
        if kind == "closed":
            start, end = first, min(last + 1, size)
        elif kind == "from":
            start, end = first, size
        else:
            start, end = max(size - last, 0), size
        if start < end:
            slices.append((start, end))
    slices.sort()
    joined = []
    for start, end in slices:
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def multipartSlices(testCase, response, size):
    boundary = re.fullmatch(
        r"multipart/byteranges; boundary=(\S+)", response.header("content-type")
    ).group(1).encode()
    parts = response.body.split(b"\r\n--" + boundary)
    testCase.assertEqual(parts[0], b"")
    testCase.assertEqual(parts[-1], b"--\r\n")
    found = []
    for part in parts[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        first, last, total = map(int, re.search(rb"Content-Range: bytes (\d+)-(\d+)/(\d+)", head).groups())
        testCase.assertEqual(total, size)
        found.append(((first, last + 1), body))
    return found


class RangeResponseTests(SynchronousTestCase):
    maxRanges = 4

    def setUp(self):
        self.blobs = {size: os.urandom(size) for size in (0, 1, 3000, 300 * 1024)}
        self.server = InMemoryServer(makeBlobDir(self, self.blobs.values()),
                                     "--max-ranges", str(self.maxRanges))

    def get(self, size, header):
        blob = self.blobs[size]
        return blob, self.server.get(f"/v2/a/blobs/sha256:{sha256(blob)}".encode(), range=header)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(sized=st.sampled_from([0, 1, 3000, 300 * 1024]).flatmap(
        lambda size: st.tuples(st.just(size), specLists(size + 10))))
    def test_wellFormed(self, sized):
        """
        A well-formed Range header gets exactly the model's answer: the
        whole blob, one slice, each slice of a multipart answer, or 416.
        """
        size, specs = sized
        blob, response = self.get(size, render(specs))
        slices = selected(specs, size, self.maxRanges)
        if slices is None:
            self.assertEqual((response.status, response.body), (200, blob))
        elif not slices:
            self.assertEqual(response.status, 416)
            self.assertEqual(response.header("content-range"), f"bytes */{size}")
        elif len(slices) == 1:
            [(start, end)] = slices
            self.assertEqual(response.status, 206)
            self.assertEqual(response.header("content-range"), f"bytes {start}-{end - 1}/{size}")
            self.assertEqual(response.body, blob[start:end])
        else:
            self.assertEqual(response.status, 206)
            found = multipartSlices(self, response, size)
            self.assertEqual([where for where, _ in found], slices)
            for (start, end), body in found:
                self.assertEqual(body, blob[start:end])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(size=st.sampled_from([0, 1, 3000]),
           header=st.binary(max_size=40).map(lambda h: h.translate(None, b"\x00\r\n")))
    def test_anyHeader(self, size, header):
        """
        Any Range header at all is answered 200 with the blob, 206 with the
        bytes its Content-Range names, or 416; never a 500.
        """
        blob, response = self.get(size, header.strip() or b"x")
        self.assertIn(response.status, (200, 206, 416), header)
        if response.status == 200:
            self.assertEqual(response.body, blob)
        elif response.status == 206:
            if response.header("content-range"):
                first, last = map(int, re.fullmatch(
                    r"bytes (\d+)-(\d+)/%d" % size, response.header("content-range")).groups())
                self.assertEqual(response.body, blob[first : last + 1])
            else:
                for (start, end), body in multipartSlices(self, response, size):
                    self.assertEqual(body, blob[start:end])
