"""
What `pip install .` gives a user: the twistd plugin and the console
script, and a wheel that leaves Twisted's own files alone.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def run(command, cwd):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


class InstalledTests(SynchronousTestCase):
    """
    The installed package, run from a directory that is not the checkout.
    """

    def setUp(self):
        self.cwd = self.mktemp()
        os.makedirs(self.cwd)

    def test_twistdListsPlugin(self):
        """
        C{twistd --help} lists nydus-proxy among its commands.
        """
        result = run([*TWISTD, "--help"], self.cwd)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+nydus-proxy\s+Serve a directory of Nydus blobs")

    def test_pluginHelp(self):
        """
        C{twistd nydus-proxy --help} shows the options.
        """
        result = run([*TWISTD, "nydus-proxy", "--help"], self.cwd)
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--blobsdir", "--listen", "--max-ranges", "--no-access-log"):
            self.assertIn(option, result.stdout)

    def test_consoleScriptHelp(self):
        """
        The C{nydus-backend-proxy} console script takes the same options.
        """
        script = Path(sys.executable).parent / "nydus-backend-proxy"
        if not script.exists():
            raise SkipTest(f"{script} is not installed (pip install . installs it)")
        result = run([str(script), "--help"], self.cwd)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--blobsdir", result.stdout)


class WheelTests(SynchronousTestCase):
    def test_wheelContents(self):
        """
        The wheel ships the package and the dropin module, and never a
        C{twisted/__init__.py}, a C{twisted/plugins/__init__.py} or a
        C{dropin.cache}, even when one lies in the checkout.
        """
        stray = ROOT / "twisted" / "plugins" / "dropin.cache"
        hadStray = stray.exists()
        if not hadStray:
            stray.write_bytes(b"stray")
            self.addCleanup(stray.unlink)
        out = Path(self.mktemp()).resolve()
        result = run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(ROOT)],
            ROOT,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [wheel] = out.glob("nydus_proxy-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        self.assertIn("twisted/plugins/nydusproxy_plugin.py", names)
        self.assertIn("nydusproxy/web.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual([n for n in names if "dropin.cache" in n], [])
        self.assertEqual([n for n in names if n.startswith("tests/")], [])
