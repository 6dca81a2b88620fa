"""
Image layouts served to real registry clients over loopback: skopeo pulls
(copy, inspect, list-tags) of layouts written by umoci and by the tests'
writer, a nydus image among them, and a nydusd-style reader of its blobs.

The server runs in this process on trial's reactor; the tools run as child
processes through the reactor, so it keeps serving while they work.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile

import treq.client
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from nydusproxy import tap

from .layouts import (
    NYDUS_BLOB,
    NYDUS_BLOB_ANNOTATION,
    NYDUS_BOOTSTRAP_ANNOTATION,
    NYDUS_BOOTSTRAP_PATH,
    NYDUS_V5_BOOTSTRAP,
    LayoutWriter,
)
from .support import FIXTURE_BLOBS, FIXTURES

SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
MISSING = "{tool} is not installed (Debian: apt-get install {tool}); .ci/run installs it"


def requireTool(path: str | None, tool: str) -> str:
    if path is None:
        raise SkipTest(MISSING.format(tool=tool))
    return path


def blobFiles(layout: str) -> dict[str, bytes]:
    """
    The blobs of a layout by digest, and their bytes.
    """
    found = {}
    for algorithm in os.listdir(os.path.join(layout, "blobs")):
        directory = os.path.join(layout, "blobs", algorithm)
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb") as f:
                found[f"{algorithm}:{name}"] = f.read()
    return found


def indexEntries(layout: str) -> list[dict]:
    with open(os.path.join(layout, "index.json"), "rb") as f:
        return json.load(f)["manifests"]


class ServedLayoutsTestCase(TestCase):
    """
    A real loopback listener serving C{--images ROOT}, and a skopeo that
    touches nothing of the user's (its own HOME, XDG dirs, policy and
    registries.conf).
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.scratch = os.path.abspath(self.mktemp())
        home = os.path.join(self.scratch, "home")
        for directory in ("home", "config", "data", "cache", "run", "tmp", "out"):
            os.makedirs(os.path.join(self.scratch, directory))
        os.chmod(os.path.join(self.scratch, "run"), 0o700)
        self.policy = os.path.join(self.scratch, "policy.json")
        with open(self.policy, "w") as f:
            json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
        registries = os.path.join(self.scratch, "registries.conf")
        with open(registries, "w") as f:
            f.write("unqualified-search-registries = []\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(self.scratch, "config"),
            "XDG_DATA_HOME": os.path.join(self.scratch, "data"),
            "XDG_CACHE_HOME": os.path.join(self.scratch, "cache"),
            "XDG_RUNTIME_DIR": os.path.join(self.scratch, "run"),
            "TMPDIR": os.path.join(self.scratch, "tmp"),
            "CONTAINERS_REGISTRIES_CONF": registries,
        }

    def serve(self, *extra: str) -> None:
        options = tap.Options()
        options.parseOptions(["--images", self.root, "--no-access-log", *extra])
        site = tap.buildSite(options, reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.host = f"127.0.0.1:{port.getHost().port}"

    async def skopeo(self, *arguments: str) -> bytes:
        skopeo = requireTool(SKOPEO, "skopeo")
        out, err, code = await getProcessOutputAndValue(
            skopeo, ["--policy", self.policy, *arguments], env=self.env, reactor=reactor
        )
        self.assertEqual(code, 0, f"skopeo {' '.join(arguments)}: {err.decode(errors='replace')}")
        return out

    async def pull(self, name: str, tag: str, *options: str) -> str:
        """
        C{skopeo copy} an image to a new OCI layout; return its path.
        """
        destination = os.path.join(self.scratch, "out", f"{name.replace('/', '_')}-{tag}")
        await self.skopeo(
            "copy", "--quiet", "--src-tls-verify=false", *options,
            f"docker://{self.host}/{name}:{tag}", f"oci:{destination}:{tag}",
        )
        return destination

    def assertSameContent(self, source: str, copy: str, tag: str, expectedBlobs: int) -> None:
        """
        The copy's tag names the source tag's manifest, and every blob of
        the copy (manifests, configs, layers) is byte for byte the
        source's.
        """
        sourceEntry = [e for e in indexEntries(source)
                       if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        [copyEntry] = indexEntries(copy)
        self.assertEqual(copyEntry["digest"], sourceEntry[0]["digest"])
        self.assertEqual(copyEntry["mediaType"], sourceEntry[0]["mediaType"])
        sourceBlobs = blobFiles(source)
        copied = blobFiles(copy)
        self.assertEqual(len(copied), expectedBlobs, sorted(copied))
        for digest, data in copied.items():
            self.assertEqual(data, sourceBlobs[digest], digest)


class SkopeoWriterLayoutTests(ServedLayoutsTestCase):
    """
    Layouts from the tests' writer: an image, a multi-platform index, an
    artifact with a subject, and a nydus image.
    """

    def setUp(self):
        super().setUp()
        if not (FIXTURES / "blobs").is_dir():
            raise SkipTest(f"the nydus fixtures are not at {FIXTURES}")
        self.demo = os.path.join(self.root, "library", "demo")
        w = LayoutWriter(self.demo)
        self.image, self.imageBytes = w.simpleImage(b"hello\n")
        w.add(self.image, "v1")
        amd, _ = w.simpleImage(b"amd64\n", "amd64")
        arm, _ = w.simpleImage(b"arm64\n", "arm64")
        index, _ = w.index([
            {**amd, "platform": {"architecture": "amd64", "os": "linux"}},
            {**arm, "platform": {"architecture": "arm64", "os": "linux"}},
        ])
        w.add(index, "multi")
        self.artifact, _ = w.artifact("application/vnd.example.sbom.v1", b"sbom", self.image)
        w.add(self.artifact, "sbom")
        self.nydus = os.path.join(self.root, "nydus", "demo")
        n = LayoutWriter(self.nydus)
        workdir = os.path.join(self.scratch, "fixtures")
        os.makedirs(workdir)
        self.nydusImage, self.nydusBytes = n.nydusImage(workdir)
        n.add(self.nydusImage, "latest")
        # The fixtures' other blobs are held by the layout too (one is not
        # named by its sha256, as nydus blob ids may not be).
        for blobId in FIXTURE_BLOBS:
            shutil.copyfile(FIXTURES / "blobs" / blobId,
                            os.path.join(self.nydus, "blobs", "sha256", blobId))
        self.serve()

    async def test_pullImage(self):
        """
        skopeo copies the image: manifest, config and layer byte for byte.
        """
        copy = await self.pull("library/demo", "v1")
        self.assertSameContent(self.demo, copy, "v1", 3)

    async def test_pullIndexAllPlatforms(self):
        """
        skopeo copies the multi-platform index with every platform: the
        index, both manifests (fetched by digest), configs and layers.
        """
        copy = await self.pull("library/demo", "multi", "--all")
        self.assertSameContent(self.demo, copy, "multi", 7)

    async def test_pullIndexOnePlatform(self):
        """
        skopeo picks a platform of the index and copies that image.
        """
        copy = await self.pull("library/demo", "multi", "--override-arch", "arm64")
        [entry] = indexEntries(copy)
        manifest = blobFiles(copy)[entry["digest"]]
        config = blobFiles(copy)[json.loads(manifest)["config"]["digest"]]
        self.assertEqual(json.loads(config)["architecture"], "arm64")
        self.assertEqual(blobFiles(self.demo)[entry["digest"]], manifest)

    async def test_pullArtifact(self):
        """
        skopeo copies the artifact with a subject as it is.
        """
        copy = await self.pull("library/demo", "sbom")
        self.assertSameContent(self.demo, copy, "sbom", 3)
        manifest = json.loads(blobFiles(copy)[self.artifact["digest"]])
        self.assertEqual(manifest["subject"]["digest"], self.image["digest"])

    async def test_inspect(self):
        """
        skopeo inspect reads the manifest, config and tags; with --raw it
        prints the stored manifest bytes.
        """
        out = await self.skopeo("inspect", "--tls-verify=false",
                                f"docker://{self.host}/library/demo:v1")
        inspected = json.loads(out)
        self.assertEqual(inspected["Digest"], self.image["digest"])
        self.assertEqual(inspected["RepoTags"], ["multi", "sbom", "v1"])
        self.assertEqual((inspected["Architecture"], inspected["Os"]), ("amd64", "linux"))
        raw = await self.skopeo("inspect", "--raw", "--tls-verify=false",
                                f"docker://{self.host}/library/demo@{self.image['digest']}")
        self.assertEqual(raw.rstrip(b"\n"), self.imageBytes)

    async def test_listTags(self):
        """
        skopeo list-tags lists the layout's tags.
        """
        out = await self.skopeo("list-tags", "--tls-verify=false",
                                f"docker://{self.host}/library/demo")
        self.assertEqual(json.loads(out)["Tags"], ["multi", "sbom", "v1"])
        out = await self.skopeo("list-tags", "--tls-verify=false",
                                f"docker://{self.host}/nydus/demo")
        self.assertEqual(json.loads(out)["Tags"], ["latest"])

    async def test_pullNydusImage(self):
        """
        The nydus image pulls like any image: its nydus blob layer and its
        bootstrap layer arrive byte for byte, with nydusify's media types
        and annotations.
        """
        copy = await self.pull("nydus/demo", "latest")
        self.assertSameContent(self.nydus, copy, "latest", 4)
        manifest = json.loads(blobFiles(copy)[self.nydusImage["digest"]])
        blob, bootstrap = manifest["layers"]
        self.assertEqual(blob["mediaType"], NYDUS_BLOB)
        self.assertEqual(blob["annotations"][NYDUS_BLOB_ANNOTATION], "true")
        self.assertEqual(bootstrap["annotations"][NYDUS_BOOTSTRAP_ANNOTATION], "true")
        tarGz = blobFiles(copy)[bootstrap["digest"]]
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(tarGz))) as tar:
            self.assertEqual(tar.getnames(), [NYDUS_BOOTSTRAP_PATH])
            bootstrapFile = tar.extractfile(NYDUS_BOOTSTRAP_PATH).read()
        with open(FIXTURES / "bootstrap" / NYDUS_V5_BOOTSTRAP, "rb") as f:
            self.assertEqual(bootstrapFile, f.read())

    async def test_nydusdReadsBlobs(self):
        """
        A nydusd-style reader under the image's name: HEAD for each blob's
        size, then ranged GETs of 4 KiB to 1 MiB on kept-alive connections,
        and every byte compared; a whole-blob GET too.
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 2
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        lengths = [4096, 131072, 1048576, 12345, 65536]
        for blobId in FIXTURE_BLOBS:
            with open(FIXTURES / "blobs" / blobId, "rb") as f:
                data = f.read()
            url = f"http://{self.host}/v2/nydus/demo/blobs/sha256:{blobId}"
            head = await client.head(url)
            self.assertEqual(head.code, 200)
            self.assertEqual(head.headers.getRawHeaders("content-length"), [str(len(data))])
            received = []
            offset = 0
            step = 0
            while offset < len(data):
                last = min(offset + lengths[step % len(lengths)], len(data)) - 1
                response = await client.get(url, headers={"Range": f"bytes={offset}-{last}"})
                self.assertEqual(response.code, 206)
                self.assertEqual(
                    response.headers.getRawHeaders("content-range"),
                    [f"bytes {offset}-{last}/{len(data)}"],
                )
                body = await response.content()
                self.assertEqual(body, data[offset : last + 1], (blobId, offset))
                received.append(body)
                offset = last + 1
                step += 1
            self.assertEqual(b"".join(received), data)
            whole = await client.get(url)
            self.assertEqual(await whole.content(), data)


class SkopeoUmociLayoutTests(ServedLayoutsTestCase):
    """
    A layout that umoci wrote (init, new, insert, tag) pulls with skopeo.
    """

    async def umoci(self, *arguments: str) -> bytes:
        umoci = requireTool(UMOCI, "umoci")
        out, err, code = await getProcessOutputAndValue(
            umoci, list(arguments), env=self.env, path=self.scratch, reactor=reactor
        )
        self.assertEqual(code, 0, f"umoci {' '.join(arguments)}: {err.decode(errors='replace')}")
        return out

    async def test_pullUmociImage(self):
        """
        Every tag of an umoci layout is listed and pulls byte for byte; a
        tag umoci removes while the server runs is gone at once.
        """
        requireTool(SKOPEO, "skopeo")
        requireTool(UMOCI, "umoci")
        layout = os.path.join(self.root, "umoci", "busy")
        os.makedirs(os.path.dirname(layout))
        content = os.path.join(self.scratch, "motd")
        with open(content, "w") as f:
            f.write("made by umoci\n")
        await self.umoci("init", "--layout", layout)
        await self.umoci("new", "--image", f"{layout}:base")
        self.serve()
        await self.umoci("insert", "--image", f"{layout}:base", content, "/etc/motd")
        await self.umoci("tag", "--image", f"{layout}:base", "v1.0")
        await self.umoci("new", "--image", f"{layout}:empty")
        out = await self.skopeo("list-tags", "--tls-verify=false", f"docker://{self.host}/umoci/busy")
        self.assertEqual(json.loads(out)["Tags"], ["base", "empty", "v1.0"])
        for tag, blobs in (("base", 3), ("v1.0", 3), ("empty", 2)):
            copy = await self.pull("umoci/busy", tag)
            self.assertSameContent(layout, copy, tag, blobs)
        await self.umoci("rm", "--image", f"{layout}:empty")
        out = await self.skopeo("list-tags", "--tls-verify=false", f"docker://{self.host}/umoci/busy")
        self.assertEqual(json.loads(out)["Tags"], ["base", "v1.0"])
