"""
The nydusd configurations that README.rst shows are JSON, and use the fields
nydusd reads (api/src/config.rs in the Nydus source: RegistryConfig,
ProxyConfig, MirrorConfig), with the types it expects.
"""

import json
import re
from urllib.parse import urlsplit

from twisted.trial.unittest import SynchronousTestCase

from .processes import ROOT

REGISTRY_FIELDS = {
    "scheme", "host", "repo", "auth", "skip_verify", "timeout", "connect_timeout",
    "retry_limit", "registry_token", "blob_url_scheme", "blob_redirected_host",
    "proxy", "mirrors", "ca_cert_files",
}
PROXY_FIELDS = {"url": str, "ping_url": str, "fallback": bool, "check_interval": int, "use_http": bool}
MIRROR_FIELDS = {
    "host": str, "ping_url": str, "headers": dict, "auth_through": bool,
    "health_check_interval": int, "failure_limit": int,
}


def literalBlocks(text):
    """
    The literal blocks of a reStructuredText document (after "::"), without
    their indentation.
    """
    blocks = []
    for match in re.finditer(r"::\n\n((?:(?:    .*)?\n)+)", text):
        lines = match.group(1).rstrip("\n").split("\n")
        blocks.append("\n".join(line[4:] for line in lines))
    return blocks


def nydusdConfigs():
    return [
        json.loads(block) for block in literalBlocks((ROOT / "README.rst").read_text())
        if block.startswith('{\n  "device"')
    ]


def backends(backendType):
    return [
        config["device"]["backend"]["config"] for config in nydusdConfigs()
        if config["device"]["backend"]["type"] == backendType
    ]


class ReadmeConfigTests(SynchronousTestCase):
    def assertURL(self, url):
        parts = urlsplit(url)
        self.assertIn(parts.scheme, ("http", "https"), url)
        self.assertTrue(parts.hostname and parts.port, url)
        return parts

    def test_allParse(self):
        """
        Every nydusd configuration in the README is JSON (json.loads raises
        otherwise): the plain registry, http-proxy, proxy and mirrors ones.
        """
        self.assertGreaterEqual(len(backends("registry")), 3)
        self.assertGreaterEqual(len(backends("http-proxy")), 1)

    def test_registryFields(self):
        """
        Registry configurations use only RegistryConfig's fields, with a
        host of "address:port" and no scheme.
        """
        for config in backends("registry"):
            self.assertLessEqual(set(config), REGISTRY_FIELDS)
            self.assertIn(config["scheme"], ("http", "https"))
            self.assertRegex(config["host"], r"^[A-Za-z0-9.-]+:\d+$")
            self.assertRegex(config["repo"], r"^[a-z0-9]+(/[a-z0-9]+)*$")

    def test_proxy(self):
        """
        The proxy (Dragonfly) example: ProxyConfig's fields and types, a
        proxy URL, and a ping URL that is a registry's /v2/ check.
        """
        [proxy] = [c["proxy"] for c in backends("registry") if "proxy" in c]
        self.assertEqual(set(proxy), {"url", "ping_url", "fallback", "check_interval"})
        for name, value in proxy.items():
            self.assertIsInstance(value, PROXY_FIELDS[name], name)
        self.assertURL(proxy["url"])
        self.assertEqual(self.assertURL(proxy["ping_url"]).path, "/v2/")
        self.assertTrue(proxy["fallback"])

    def test_mirrors(self):
        """
        The mirrors example: MirrorConfig's fields and types, each host a
        URL with scheme and port, each ping_url that host's /v2/, and a
        failure_limit that fits nydusd's u8.
        """
        [config] = [c for c in backends("registry") if "mirrors" in c]
        mirrors = config["mirrors"]
        self.assertGreaterEqual(len(mirrors), 2)
        hosts = {config["host"]}
        for mirror in mirrors:
            self.assertLessEqual(set(mirror), set(MIRROR_FIELDS))
            for name, value in mirror.items():
                self.assertIsInstance(value, MIRROR_FIELDS[name], name)
                self.assertNotIsInstance(value, bool if MIRROR_FIELDS[name] is int else ())
            host = self.assertURL(mirror["host"])
            self.assertEqual(host.path, "")
            ping = self.assertURL(mirror["ping_url"])
            self.assertEqual((ping.netloc, ping.path), (host.netloc, "/v2/"))
            self.assertIn(mirror["failure_limit"], range(1, 256))
            self.assertGreater(mirror["health_check_interval"], 0)
            hosts.add(host.netloc)
        # The replicas are distinct servers, none of them the registry host.
        self.assertEqual(len(hosts), len(mirrors) + 1)
