"""
The OCI distribution spec's grammars for repository names, tags and
digests: one definition, for the text of layouts and for the bytes of
request paths.
"""

from __future__ import annotations

import re

# One component of a repository name; components are joined by "/".
NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
NAME_MAX = 255
TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
# The digests this server serves: algorithm and hex in groups 1-2 or 3-4.
DIGEST = re.compile(r"(sha256):([a-f0-9]{64})\Z|(sha512):([a-f0-9]{128})\Z")


def forBytes(pattern: re.Pattern[str]) -> re.Pattern[bytes]:
    """
    The same grammar, to match bytes.
    """
    return re.compile(pattern.pattern.encode("ascii"), pattern.flags & ~re.UNICODE)
