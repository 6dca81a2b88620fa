"""
Serving image layouts (C{--images ROOT}): manifests, tags, referrers, the
catalog and blobs, on the wire of a real Site kept in memory, over layouts
written by the tests' own writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from nydusproxy import images

from .layouts import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    ImageServer,
    LayoutWriter,
    canonical,
    digestOf,
)
from .support import InMemoryServer, assertErrorCode, makeBlobDir, parseResponses, sha256

SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.signature.v1"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def captureLog(testCase, cls) -> list[str]:
    """
    The messages that C{cls.log} emits from now on in the test.
    """
    events: list[dict] = []
    testCase.patch(cls, "log", Logger(observer=events.append))
    return events


def messages(events) -> list[str]:
    return [formatEvent(event) for event in events]


def tree(path: str) -> dict[str, bytes]:
    """
    Every file under C{path} and its content.
    """
    found = {}
    for directory, _, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, path)] = f.read()
    return found


class ImagesTestCase(SynchronousTestCase):
    """
    A root with one layout, C{library/demo}: an image tagged C{v1} (and
    C{latest}), a multi-platform index tagged C{multi}, and two artifacts
    whose subject is the C{v1} image.
    """

    def setUp(self):
        self.root = self.mktemp()
        self.writer = LayoutWriter(os.path.join(self.root, "library", "demo"))
        w = self.writer
        self.image, self.imageBytes = w.simpleImage(b"hello\n")
        w.add(self.image, "v1")
        w.add(self.image, "latest")
        self.amd, self.amdBytes = w.simpleImage(b"amd64\n", "amd64")
        self.arm, self.armBytes = w.simpleImage(b"arm64\n", "arm64")
        self.index, self.indexBytes = w.index([
            {**self.amd, "platform": {"architecture": "amd64", "os": "linux"}},
            {**self.arm, "platform": {"architecture": "arm64", "os": "linux"}},
        ])
        w.add(self.index, "multi")
        self.sbom, self.sbomBytes = w.artifact(SBOM, b"sbom", self.image, {"kind": "sbom"})
        w.add(self.sbom)
        self.signature, self.signatureBytes = w.artifact(SIGNATURE, b"sig", self.image)
        w.add(self.signature)
        self.server = ImageServer("--images", self.root)

    def manifestPath(self, reference: str, name: str = "library/demo") -> bytes:
        return f"/v2/{name}/manifests/{reference}".encode()


class ManifestTests(ImagesTestCase):
    def assertManifest(self, response, descriptor, content):
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.body, content)
        self.assertEqual(response.header("content-type"), descriptor["mediaType"])
        self.assertEqual(response.header("docker-content-digest"), descriptor["digest"])
        self.assertEqual(response.header("content-length"), str(len(content)))
        self.assertEqual(response.header("etag"), f'"{descriptor["digest"]}"')
        self.assertEqual(response.header("docker-distribution-api-version"), "registry/2.0")

    def test_byTag(self):
        """
        A tag answers the exact stored bytes of its manifest, with its media
        type, digest, length and ETag.
        """
        for tag in ("v1", "latest"):
            response = self.server.get(self.manifestPath(tag))
            self.assertManifest(response, self.image, self.imageBytes)
        self.assertManifest(self.server.get(self.manifestPath("multi")), self.index, self.indexBytes)

    def test_head(self):
        """
        HEAD answers the same headers and no body.
        """
        response = self.server.get(self.manifestPath("multi"), method=b"HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-length"), str(len(self.indexBytes)))
        self.assertEqual(response.header("docker-content-digest"), self.index["digest"])
        self.assertEqual(response.header("content-type"), OCI_INDEX)
        self.assertEqual(response.body, b"")

    def test_byDigest(self):
        """
        A digest answers a manifest of index.json, or one reachable through
        an index of it (a platform image of the multi-platform index).
        """
        for descriptor, content in (
            (self.image, self.imageBytes),
            (self.index, self.indexBytes),
            (self.amd, self.amdBytes),
            (self.arm, self.armBytes),
            (self.sbom, self.sbomBytes),
        ):
            response = self.server.get(self.manifestPath(descriptor["digest"]))
            self.assertManifest(response, descriptor, content)

    def test_digestNotAManifestOfTheLayout(self):
        """
        A digest of a blob that the layout holds but that is no manifest of
        it (a config, a layer, a manifest no index lists) is 404
        MANIFEST_UNKNOWN.
        """
        config = json.loads(self.imageBytes)["config"]["digest"]
        layer = json.loads(self.imageBytes)["layers"][0]["digest"]
        stray, _ = self.writer.simpleImage(b"not listed\n")
        for digest in (config, layer, stray["digest"], "sha256:" + "0" * 64):
            error = assertErrorCode(
                self, self.server.get(self.manifestPath(digest)), 404, "MANIFEST_UNKNOWN"
            )
            self.assertEqual(error["detail"], {"name": "library/demo", "reference": digest})

    def test_mediaTypeFromDocument(self):
        """
        Without a media type in the descriptor, the manifest's own
        C{mediaType} is the Content-Type; without either, an image
        manifest's type is inferred.
        """
        docker = canonical({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                            "config": {"mediaType": OCI_CONFIG, "digest": digestOf(b"{}"),
                                       "size": 2}, "layers": []})
        bare = canonical({"schemaVersion": 2, "config": {"mediaType": OCI_CONFIG,
                          "digest": digestOf(b"{}"), "size": 2}, "layers": []})
        for content in (docker, bare):
            with open(self.writer.blobPath(digestOf(content)), "wb") as f:
                f.write(content)
        self.writer.add({"digest": digestOf(docker), "size": len(docker)}, "docker")
        self.writer.add({"digest": digestOf(bare), "size": len(bare)}, "bare")
        response = self.server.get(self.manifestPath("docker"))
        self.assertEqual((response.status, response.body), (200, docker))
        self.assertEqual(response.header("content-type"), DOCKER_MANIFEST)
        response = self.server.get(self.manifestPath("bare"))
        self.assertEqual((response.status, response.body), (200, bare))
        self.assertEqual(response.header("content-type"), OCI_MANIFEST)

    def test_acceptHeaders(self):
        """
        Every Accept line and comma list is read, parameters ignored: a
        manifest whose type is among them is served.
        """
        for lines in (
            [OCI_MANIFEST],
            [f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5"],
            [DOCKER_MANIFEST, f"{OCI_INDEX} , {OCI_MANIFEST.upper()}"],
            ["*/*"],
            ["application/*;q=0.1"],
            [DOCKER_MANIFEST, "*/*; q=0.1"],
        ):
            response = self._getWithAccept("v1", lines)
            self.assertEqual(response.status, 200, lines)
            self.assertEqual(response.body, self.imageBytes, lines)

    def _getWithAccept(self, reference, lines):
        protocol, transport = self.server.connect()
        request = [b"GET %s HTTP/1.1" % (self.manifestPath(reference),), b"Host: test"]
        request += [b"Accept: " + line.encode() for line in lines]
        protocol.dataReceived(b"\r\n".join(request) + b"\r\n\r\n")
        [response] = parseResponses(transport.value(), [b"GET"])
        protocol.connectionLost(None)
        return response

    def test_notAccepted(self):
        """
        A manifest whose type the client does not accept is 404
        MANIFEST_UNKNOWN, as distribution answers.
        """
        response = self._getWithAccept("multi", [OCI_MANIFEST, f"{DOCKER_MANIFEST};q=0.9"])
        error = assertErrorCode(self, response, 404, "MANIFEST_UNKNOWN")
        self.assertEqual(error["detail"]["mediaType"], OCI_INDEX)

    def test_noAccept(self):
        """
        A client sending no Accept header gets the manifest anyway.
        """
        response = self._getWithAccept("multi", [])
        self.assertEqual((response.status, response.body), (200, self.indexBytes))

    def test_unknownTag(self):
        """
        An unknown tag is 404 MANIFEST_UNKNOWN naming it.
        """
        error = assertErrorCode(self, self.server.get(self.manifestPath("v2")), 404, "MANIFEST_UNKNOWN")
        self.assertEqual(error["detail"], {"name": "library/demo", "reference": "v2"})

    def test_badReferences(self):
        """
        A reference that is neither a tag nor a digest is 400 DIGEST_INVALID
        when it looks like a digest, else 404 MANIFEST_UNKNOWN; never 500.
        """
        hexdigest = self.image["digest"].partition(":")[2]
        for reference in (
            "sha256:" + hexdigest.upper(),
            "sha256:" + hexdigest[:-1],
            "md5:" + hexdigest[:32],
            "sha256:",
            "a:b",
        ):
            response = self.server.get(self.manifestPath(reference))
            assertErrorCode(self, response, 400, "DIGEST_INVALID")
        for reference in ("-v1", ".v1", "v" * 129, "v1%00", "%C3%A9", "..", "v1%2Fx"):
            response = self.server.get(self.manifestPath(reference))
            assertErrorCode(self, response, 404, "MANIFEST_UNKNOWN")
        self.assertEqual(self.server.get(self.manifestPath("v" * 128)).status, 404)

    def test_unknownAndInvalidNames(self):
        """
        A name with no layout is 404 NAME_UNKNOWN; a name outside the
        grammar is 400 NAME_INVALID.
        """
        for name in ("library", "library/other", "nothing", "library/demo/blobs"):
            error = assertErrorCode(
                self, self.server.get(self.manifestPath("v1", name)), 404, "NAME_UNKNOWN"
            )
            self.assertEqual(error["detail"], {"name": name})
        for name in ("Library/demo", "library/../library/demo", "library/./demo", "a%2Fb"):
            assertErrorCode(self, self.server.get(self.manifestPath("v1", name)), 400, "NAME_INVALID")

    def test_corruptManifest(self):
        """
        A manifest file whose bytes do not match its digest is not served:
        404 MANIFEST_UNKNOWN, and a warning in the log.
        """
        events = captureLog(self, images.Layout)
        with open(self.writer.blobPath(self.image["digest"]), "r+b") as f:
            f.write(b"X")
        assertErrorCode(self, self.server.get(self.manifestPath("v1")), 404, "MANIFEST_UNKNOWN")
        self.assertEqual(
            messages(events),
            [f"Image library/demo: manifest {self.image['digest']} does not match its "
             "digest; not served"],
        )

    def test_missingManifestBlob(self):
        """
        A tag whose manifest blob is missing is 404 MANIFEST_UNKNOWN.
        """
        os.remove(self.writer.blobPath(self.image["digest"]))
        assertErrorCode(self, self.server.get(self.manifestPath("v1")), 404, "MANIFEST_UNKNOWN")

    def test_permissionDenied(self):
        """
        A manifest the server may not read is 403 DENIED.
        """
        layout = self.server.site.resource.images.root.layout("library/demo")

        def denied(descriptor):
            raise PermissionError(13, "Permission denied")

        self.patch(layout, "readManifest", denied)
        assertErrorCode(self, self.server.get(self.manifestPath("v1")), 403, "DENIED")

    def test_nonAsciiMediaTypeIgnored(self):
        """
        A descriptor media type that could not be a header value is not
        used; the document's own is.
        """
        self.writer.add({**self.image, "mediaType": "text/plain\r\nX-Evil: 1"}, "odd")
        response = self.server.get(self.manifestPath("odd"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), OCI_MANIFEST)
        self.assertIsNone(response.header("x-evil"))


class TagListTests(ImagesTestCase):
    def tags(self, query: str = "", name: str = "library/demo"):
        return self.server.get(f"/v2/{name}/tags/list{query}".encode())

    def test_all(self):
        """
        The tags of index.json, sorted, with the name; no Link.
        """
        response = self.tags()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(
            json.loads(response.body), {"name": "library/demo", "tags": ["latest", "multi", "v1"]}
        )
        self.assertIsNone(response.header("link"))

    def test_pages(self):
        """
        C{n} and C{last} page through the tags; each page but the last has
        a Link to the next, which a client follows to the end.
        """
        for tag in ("a", "b", "c", "d"):
            self.writer.add(self.image, tag)
        seen = []
        url = "/v2/library/demo/tags/list?n=3"
        links = []
        while url:
            response = self.server.get(url.encode())
            self.assertEqual(response.status, 200)
            seen.append(json.loads(response.body)["tags"])
            link = response.header("link")
            links.append(link)
            url = link[1 : link.index(">")] if link else None
        self.assertEqual(seen, [["a", "b", "c"], ["d", "latest", "multi"], ["v1"]])
        self.assertEqual(links[0], '</v2/library/demo/tags/list?n=3&last=c>; rel="next"')
        self.assertIsNone(links[-1])

    def test_last(self):
        """
        C{last} alone lists the tags after it.
        """
        self.assertEqual(json.loads(self.tags("?last=latest").body)["tags"], ["multi", "v1"])
        self.assertEqual(json.loads(self.tags("?last=zzz").body)["tags"], [])

    def test_zero(self):
        """
        C{n=0} answers an empty list and no Link.
        """
        response = self.tags("?n=0")
        self.assertEqual(json.loads(response.body)["tags"], [])
        self.assertIsNone(response.header("link"))

    def test_badNumber(self):
        """
        An C{n} that is not a whole number is 400 PAGINATION_NUMBER_INVALID.
        """
        for value in ("-1", "x", "1.5", "", "9" * 20):
            assertErrorCode(self, self.tags(f"?n={value}"), 400, "PAGINATION_NUMBER_INVALID")

    def test_unknownName(self):
        """
        An unknown name is 404 NAME_UNKNOWN.
        """
        assertErrorCode(self, self.tags(name="library/other"), 404, "NAME_UNKNOWN")

    def test_head(self):
        """
        HEAD answers the length and no body.
        """
        response = self.server.get(b"/v2/library/demo/tags/list", method=b"HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("content-length"), str(len(self.tags().body)))

    def test_oddRefNames(self):
        """
        A ref.name that is not a tag (a full reference) is not listed; the
        first of two entries with one tag wins.
        """
        self.writer.add(self.image, "docker.io/library/demo:1")
        self.writer.add(self.index, "v1")
        self.assertEqual(json.loads(self.tags().body)["tags"], ["latest", "multi", "v1"])
        response = self.server.get(self.manifestPath("v1"))
        self.assertEqual(response.body, self.imageBytes)


class ReferrerTests(ImagesTestCase):
    def referrers(self, digest, query=""):
        return self.server.get(f"/v2/library/demo/referrers/{digest}{query}".encode())

    def test_list(self):
        """
        The referrers of a manifest are an image index of the descriptors of
        the manifests whose subject it is: media type, digest, size,
        artifact type and annotations.
        """
        response = self.referrers(self.image["digest"])
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), OCI_INDEX)
        self.assertIsNone(response.header("oci-filters-applied"))
        document = json.loads(response.body)
        self.assertEqual(document["schemaVersion"], 2)
        self.assertEqual(document["mediaType"], OCI_INDEX)
        self.assertEqual(
            sorted(document["manifests"], key=lambda d: d["artifactType"]),
            [
                {"mediaType": OCI_MANIFEST, "digest": self.sbom["digest"],
                 "size": len(self.sbomBytes), "artifactType": SBOM,
                 "annotations": {"kind": "sbom"}},
                {"mediaType": OCI_MANIFEST, "digest": self.signature["digest"],
                 "size": len(self.signatureBytes), "artifactType": SIGNATURE},
            ],
        )

    def test_filter(self):
        """
        C{artifactType} keeps the descriptors of that type and says so in
        C{OCI-Filters-Applied}.
        """
        response = self.referrers(self.image["digest"], f"?artifactType={SBOM}")
        self.assertEqual(response.header("oci-filters-applied"), "artifactType")
        self.assertEqual(
            [d["digest"] for d in json.loads(response.body)["manifests"]], [self.sbom["digest"]]
        )
        response = self.referrers(self.image["digest"], "?artifactType=application/none")
        self.assertEqual(json.loads(response.body)["manifests"], [])

    def test_configTypeAsArtifactType(self):
        """
        An image manifest with a subject and no C{artifactType} is listed
        with its config's media type; a nested manifest with a subject is
        found too.
        """
        layer = self.writer.tarLayer({"note": b"x"})
        child, childBytes = self.writer.image([layer], subject=self.amd)
        index, _ = self.writer.index([child])
        self.writer.add(index, "nested")
        response = self.referrers(self.amd["digest"])
        self.assertEqual(
            json.loads(response.body)["manifests"],
            [{"mediaType": OCI_MANIFEST, "digest": child["digest"], "size": len(childBytes),
              "artifactType": OCI_CONFIG}],
        )

    def test_none(self):
        """
        A digest that nothing refers to answers an empty index.
        """
        response = self.referrers(self.amd["digest"])
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.body)["manifests"], [])

    def test_seesNewReferrers(self):
        """
        An artifact added to index.json while running is listed at once.
        """
        self.assertEqual(json.loads(self.referrers(self.arm["digest"]).body)["manifests"], [])
        artifact, _ = self.writer.artifact(SBOM, b"late", self.arm)
        self.writer.add(artifact)
        self.assertEqual(
            [d["digest"] for d in json.loads(self.referrers(self.arm["digest"]).body)["manifests"]],
            [artifact["digest"]],
        )

    def test_badDigestAndName(self):
        """
        A malformed digest is 400 DIGEST_INVALID; an unknown name 404
        NAME_UNKNOWN.
        """
        assertErrorCode(self, self.referrers("v1"), 400, "DIGEST_INVALID")
        assertErrorCode(self, self.referrers("sha256:abc"), 400, "DIGEST_INVALID")
        response = self.server.get(f"/v2/nothing/referrers/{self.image['digest']}".encode())
        assertErrorCode(self, response, 404, "NAME_UNKNOWN")


class BlobTests(ImagesTestCase):
    def blob(self, digest, name="library/demo", method=b"GET", **headers):
        return self.server.get(f"/v2/{name}/blobs/{digest}".encode(), method=method, **headers)

    def test_layoutBlobs(self):
        """
        The layout's blobs are served, with ranges, through the blob
        machinery; so are manifests, as blobs.
        """
        for digest in os.listdir(os.path.join(self.writer.path, "blobs", "sha256")):
            with open(os.path.join(self.writer.path, "blobs", "sha256", digest), "rb") as f:
                data = f.read()
            response = self.blob("sha256:" + digest)
            self.assertEqual((response.status, response.body), (200, data))
            self.assertEqual(response.header("docker-content-digest"), "sha256:" + digest)
            head = self.blob("sha256:" + digest, method=b"HEAD")
            self.assertEqual(head.header("content-length"), str(len(data)))
            ranged = self.blob("sha256:" + digest, range=b"bytes=1-4")
            last = min(4, len(data) - 1)
            self.assertEqual((ranged.status, ranged.body), (206, data[1:5]))
            self.assertEqual(ranged.header("content-range"), f"bytes 1-{last}/{len(data)}")

    def test_onlyThatLayout(self):
        """
        A blob of another layout is 404 BLOB_UNKNOWN under this name; a name
        with no layout is 404 NAME_UNKNOWN when there is no blob directory.
        """
        other = LayoutWriter(os.path.join(self.root, "other"))
        descriptor = other.blob(b"only in other", "application/octet-stream")
        self.assertEqual(self.blob(descriptor["digest"], "other").body, b"only in other")
        assertErrorCode(self, self.blob(descriptor["digest"]), 404, "BLOB_UNKNOWN")
        assertErrorCode(self, self.blob(self.image["digest"], "nothing"), 404, "NAME_UNKNOWN")
        assertErrorCode(
            self, self.server.get(f"/nothing/blobs/{self.image['digest']}".encode()),
            404, "NAME_UNKNOWN",
        )

    def test_besideBlobsdir(self):
        """
        With --blobsdir too, a layout's name serves its blobs and then the
        blob directory's; any other name serves the blob directory as
        before, in every route form.
        """
        blobsdir = makeBlobDir(self, [b"flat blob"])
        server = ImageServer("--images", self.root, "--blobsdir", blobsdir)
        flat = "sha256:" + sha256(b"flat blob")
        for url in (
            f"/v2/library/demo/blobs/{flat}",
            f"/v2/anything/blobs/{flat}",
            f"/anything/blobs/{flat}",
            f"/v2/library/demo/blobs/{sha256(b'flat blob')}",
        ):
            response = server.get(url.encode())
            self.assertEqual((response.status, response.body), (200, b"flat blob"), url)
        response = server.get(f"/v2/library/demo/blobs/{self.image['digest']}".encode())
        self.assertEqual(response.body, self.imageBytes)
        response = server.get(f"/v2/anything/blobs/{self.image['digest']}".encode())
        assertErrorCode(self, response, 404, "BLOB_UNKNOWN")

    def test_linksOutsideRoot(self):
        """
        A blob linked to a file outside the root, or a layout whose blobs
        directory leads outside, serves nothing; a link inside the root is
        followed.
        """
        outside = makeBlobDir(self, [b"secret"])
        secret = sha256(b"secret")
        blobs = os.path.join(self.writer.path, "blobs", "sha256")
        os.symlink(os.path.join(outside, secret), os.path.join(blobs, secret))
        assertErrorCode(self, self.blob("sha256:" + secret), 404, "BLOB_UNKNOWN")
        os.remove(os.path.join(blobs, secret))

        other = LayoutWriter(os.path.join(self.root, "other"))
        shutil.rmtree(os.path.join(other.path, "blobs"))
        os.makedirs(os.path.join(outside, "sha256"))
        shutil.copy(os.path.join(outside, secret), os.path.join(outside, "sha256", secret))
        os.symlink(outside, os.path.join(other.path, "blobs"))
        assertErrorCode(self, self.blob("sha256:" + secret, "other"), 404, "BLOB_UNKNOWN")

        shared = LayoutWriter(os.path.join(self.root, "shared"))
        shutil.rmtree(os.path.join(shared.path, "blobs"))
        os.symlink(os.path.abspath(os.path.join(self.writer.path, "blobs")),
                   os.path.join(shared.path, "blobs"))
        self.assertEqual(self.blob(self.image["digest"], "shared").body, self.imageBytes)


class LayoutLookupTests(SynchronousTestCase):
    def setUp(self):
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.server = ImageServer("--images", self.root)

    def tags(self, name):
        response = self.server.get(f"/v2/{name}/tags/list".encode())
        return json.loads(response.body).get("tags") if response.status == 200 else response.status

    def test_seenWithoutRestart(self):
        """
        A layout added, retagged, or removed while the server runs is seen
        at the next request.
        """
        self.assertEqual(self.tags("late"), 404)
        writer = LayoutWriter(os.path.join(self.root, "late"))
        image, content = writer.simpleImage(b"late\n")
        writer.add(image, "one")
        self.assertEqual(self.tags("late"), ["one"])
        writer.add(image, "two")
        self.assertEqual(self.tags("late"), ["one", "two"])
        self.assertEqual(self.server.get(b"/v2/late/manifests/two").body, content)
        shutil.rmtree(writer.path)
        self.assertEqual(self.tags("late"), 404)

    def test_changedInPlace(self):
        """
        index.json rewritten in place (same inode), with another size, is
        read again.
        """
        writer = LayoutWriter(os.path.join(self.root, "inplace"))
        image, _ = writer.simpleImage(b"x\n")
        writer.add(image, "one")
        self.assertEqual(self.tags("inplace"), ["one"])
        path = os.path.join(writer.path, "index.json")
        inode = os.stat(path).st_ino
        document = {"schemaVersion": 2, "manifests": [
            {**image, "annotations": {REF_NAME: "renamed-tag"}}]}
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(json.dumps(document).encode())
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertEqual(self.tags("inplace"), ["renamed-tag"])

    def test_parsedOnce(self):
        """
        An unchanged index.json is parsed once, however many requests use
        it.
        """
        writer = LayoutWriter(os.path.join(self.root, "once"))
        image, _ = writer.simpleImage(b"x\n")
        writer.add(image, "one")
        parsed = []
        original = images.ImageRoot._parse

        def counting(root, *args):
            parsed.append(args[0])
            return original(root, *args)

        self.patch(images.ImageRoot, "_parse", counting)
        for _ in range(5):
            self.assertEqual(self.tags("once"), ["one"])
            self.assertEqual(self.server.get(b"/v2/once/manifests/one").status, 200)
        self.assertEqual(parsed, ["once"])

    def test_noDirectoryListing(self):
        """
        Starting, and answering manifests, tags, referrers and blobs, list
        no directory: their cost does not grow with the number of blobs.
        Only the catalog walks.
        """
        writer = LayoutWriter(os.path.join(self.root, "big"))
        image, _ = writer.simpleImage(b"x\n")
        writer.add(image, "one")
        for i in range(200):
            writer.blob(b"%d" % i, "application/octet-stream")

        def forbidden(*args, **kwargs):
            raise AssertionError("a directory was listed")

        self.patch(os, "scandir", forbidden)
        self.patch(os, "listdir", forbidden)
        self.patch(os, "walk", forbidden)
        server = ImageServer("--images", self.root)
        self.assertEqual(server.get(b"/v2/big/manifests/one").status, 200)
        self.assertEqual(server.get(b"/v2/big/tags/list").status, 200)
        self.assertEqual(server.get(f"/v2/big/referrers/{image['digest']}".encode()).status, 200)
        self.assertEqual(server.get(f"/v2/big/blobs/{image['digest']}".encode()).status, 200)
        self.assertEqual(server.get(b"/v2/_catalog").status, 500)
        self.flushLoggedErrors(AssertionError)

    def test_notLayouts(self):
        """
        A directory without oci-layout, with an index.json that is not
        JSON or not an index, or whose index.json is a link, is not a
        layout: 404 NAME_UNKNOWN.
        """
        broken = LayoutWriter(os.path.join(self.root, "broken"))
        with open(os.path.join(broken.path, "index.json"), "w") as f:
            f.write("{not json")
        notIndex = LayoutWriter(os.path.join(self.root, "notindex"))
        with open(os.path.join(notIndex.path, "index.json"), "w") as f:
            f.write('{"manifests": 3}')
        noMarker = LayoutWriter(os.path.join(self.root, "nomarker"))
        os.remove(os.path.join(noMarker.path, "oci-layout"))
        linked = LayoutWriter(os.path.join(self.root, "linked"))
        os.rename(os.path.join(linked.path, "index.json"), os.path.join(self.root, "elsewhere.json"))
        os.symlink(os.path.join(self.root, "elsewhere.json"), os.path.join(linked.path, "index.json"))
        events = captureLog(self, images.ImageRoot)
        for name in ("broken", "notindex", "nomarker", "linked"):
            for _ in range(2):
                response = self.server.get(f"/v2/{name}/tags/list".encode())
                assertErrorCode(self, response, 404, "NAME_UNKNOWN")
        # Logged once per version of index.json, not per request.
        self.assertEqual(
            messages(events),
            [
                "Image broken: index.json is not served: Expecting property name "
                "enclosed in double quotes: line 1 column 2 (char 1)",
                "Image notindex: index.json is not served: not an image index",
            ],
        )

    def test_linkedLayoutOutsideRoot(self):
        """
        A name linked to a layout outside the root is unknown; linked to a
        layout inside the root, it is that layout.
        """
        outside = self.mktemp()
        writer = LayoutWriter(outside)
        image, _ = writer.simpleImage(b"x\n")
        writer.add(image, "one")
        os.symlink(os.path.abspath(outside), os.path.join(self.root, "escape"))
        assertErrorCode(self, self.server.get(b"/v2/escape/tags/list"), 404, "NAME_UNKNOWN")
        inside = LayoutWriter(os.path.join(self.root, "real"))
        inside.add(image, "one")
        os.symlink("real", os.path.join(self.root, "alias"))
        self.assertEqual(self.tags("alias"), ["one"])

    def test_cacheBounded(self):
        """
        At most C{maxCached} parsed layouts are kept.
        """
        root = self.server.site.resource.images.root
        self.patch(root, "maxCached", 3)
        for i in range(6):
            LayoutWriter(os.path.join(self.root, f"l{i}"))
            self.assertEqual(self.tags(f"l{i}"), [])
        self.assertEqual(list(root._cache), ["l3", "l4", "l5"])


class CatalogTests(SynchronousTestCase):
    def setUp(self):
        self.root = self.mktemp()
        for name in ("library/ubuntu", "library/alpine", "a", "a-b", "a/x/y", "z.z/q"):
            LayoutWriter(os.path.join(self.root, *name.split("/")))
        # Not layouts, or not reachable names.
        os.makedirs(os.path.join(self.root, "empty", "dir"))
        LayoutWriter(os.path.join(self.root, "Upper"))
        LayoutWriter(os.path.join(self.root, "a", "blobs", "sha256", "nested"))
        outside = self.mktemp()
        LayoutWriter(outside)
        os.symlink(os.path.abspath(outside), os.path.join(self.root, "escape"))
        os.symlink("library/ubuntu", os.path.join(self.root, "alias"))
        os.symlink(".", os.path.join(self.root, "loop"))
        self.server = ImageServer("--images", self.root)

    def catalog(self, query=""):
        return self.server.get(f"/v2/_catalog{query}".encode())

    def test_all(self):
        """
        Every layout of a valid name under the root, sorted; links to a
        layout inside the root are listed, links outside or loops are not,
        and a layout's blobs directory is not walked.
        """
        response = self.catalog()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(
            json.loads(response.body),
            {"repositories": ["a", "a-b", "a/x/y", "alias", "library/alpine",
                              "library/ubuntu", "z.z/q"]},
        )

    def test_pages(self):
        """
        C{n} and C{last} page through the catalog with Link headers.
        """
        pages = []
        url = "/v2/_catalog?n=3"
        while url:
            response = self.server.get(url.encode())
            pages.append(json.loads(response.body)["repositories"])
            link = response.header("link")
            url = link[1 : link.index(">")] if link else None
        self.assertEqual(
            pages, [["a", "a-b", "a/x/y"], ["alias", "library/alpine", "library/ubuntu"], ["z.z/q"]]
        )
        response = self.catalog("?n=2&last=library%2Falpine")
        self.assertEqual(json.loads(response.body)["repositories"], ["library/ubuntu", "z.z/q"])
        self.assertIsNone(response.header("link"))
        assertErrorCode(self, self.catalog("?n=x"), 400, "PAGINATION_NUMBER_INVALID")

    def test_bounded(self):
        """
        The walk stops after C{maxCatalogEntries} directory entries, with
        a warning in the log, and answers what it found.
        """
        events = captureLog(self, images.ImageRoot)
        complete = json.loads(self.catalog().body)["repositories"]
        self.assertEqual(events, [])
        root = self.server.site.resource.images.root
        self.patch(root, "maxCatalogEntries", 4)
        response = self.catalog()
        self.assertEqual(response.status, 200)
        partial = json.loads(response.body)["repositories"]
        self.assertLess(len(partial), len(complete))
        self.assertLessEqual(set(partial), set(complete))
        self.assertEqual(
            messages(events),
            [f"The catalog lists only the layouts found in the first 4 directory "
             f"entries under {os.path.abspath(self.root)}"],
        )

    def test_withoutImages(self):
        """
        Without --images the catalog is not there: 404, as before.
        """
        server = InMemoryServer(makeBlobDir(self))
        assertErrorCode(self, server.get(b"/v2/_catalog"), 404, "NAME_UNKNOWN")


class ReadOnlyTests(ImagesTestCase):
    def test_writesUnsupported(self):
        """
        Uploads, manifest PUTs and DELETEs are 405 UNSUPPORTED, and nothing
        under the root changes.
        """
        before = tree(self.root)
        for method, url in (
            (b"POST", "/v2/library/demo/blobs/uploads/"),
            (b"PATCH", "/v2/library/demo/blobs/uploads/1"),
            (b"PUT", "/v2/library/demo/blobs/uploads/1?digest=" + self.image["digest"]),
            (b"PUT", "/v2/library/demo/manifests/v2"),
            (b"PUT", "/v2/newname/manifests/v1"),
            (b"DELETE", "/v2/library/demo/manifests/v1"),
            (b"DELETE", f"/v2/library/demo/manifests/{self.image['digest']}"),
            (b"DELETE", f"/v2/library/demo/blobs/{self.image['digest']}"),
            (b"POST", "/v2/library/demo/referrers/" + self.image["digest"]),
            (b"DELETE", "/v2/_catalog"),
        ):
            response = self.server.get(url.encode(), method=method)
            assertErrorCode(self, response, 405, "UNSUPPORTED")
            self.assertEqual(response.header("allow"), "GET, HEAD")
        self.assertEqual(tree(self.root), before)
        self.assertEqual(self.server.get(self.manifestPath("v1")).body, self.imageBytes)


class DescriptorTests(SynchronousTestCase):
    def test_fromJSON(self):
        """
        Only descriptors with a supported digest and a whole size are kept.
        """
        good = {"digest": "sha256:" + "a" * 64, "size": 3, "mediaType": OCI_MANIFEST}
        self.assertEqual(
            images.Descriptor.fromJSON(good),
            images.Descriptor("sha256:" + "a" * 64, 3, OCI_MANIFEST, {}),
        )
        for bad in (
            [], "x", {**good, "digest": "sha256:xyz"}, {**good, "size": -1},
            {**good, "size": True}, {**good, "size": "3"}, {k: good[k] for k in ("size",)},
        ):
            self.assertIsNone(images.Descriptor.fromJSON(bad), bad)
        sha512 = {"digest": "sha512:" + hashlib.sha512(b"").hexdigest(), "size": 0}
        self.assertEqual(images.Descriptor.fromJSON(sha512).mediaType, None)

    def test_names(self):
        """
        The name grammar, with its 255-character bound.
        """
        for name in ("a", "library/ubuntu", "a.b/c__d/e--f", "x" * 255):
            self.assertTrue(images.isValidName(name), name)
        for name in ("", "A", "a/", "/a", "a//b", "..", "a/../b", "x" * 256, "a_"):
            self.assertFalse(images.isValidName(name), name)
