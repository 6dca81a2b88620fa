"""
Finding a blob's file in the blob directory, by validated digest.

Nothing is cached and nothing is scanned: every lookup opens the file anew,
so blobs added, replaced or removed while the server runs are seen at once,
and a directory of 100,000 blobs costs nothing at start.
"""

from __future__ import annotations

import errno
import os
import stat

_OPEN_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
)

# Errors of open(2) that mean "there is no blob here".
_ABSENT = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP}
)


class BlobStore:
    """
    The blob directory: flat C{DIR/<hex>} files as C{nydus-image --blob-dir}
    writes them, or C{DIR/blobs/<algorithm>/<hex>} as in an OCI image layout.

    Only regular files are blobs.  A symbolic link is followed only when it
    resolves inside the directory.
    """

    def __init__(self, path: str, boundary: str | None = None) -> None:
        """
        @param boundary: the directory that a link must resolve inside to
            be followed; C{path} itself by default.
        """
        self.path = os.path.abspath(path)
        self._prefix = os.path.join(self.path, "")
        self._realPath = os.path.realpath(self.path if boundary is None else boundary)

    def open(self, algorithm: str, hexdigest: str) -> tuple[int, os.stat_result] | None:
        """
        Open the blob named by C{hexdigest}, which the caller has checked is
        lowercase hex of the length C{algorithm} gives.

        @return: an open file descriptor and its C{fstat}, or L{None} if no
            regular file of that name is in the directory.  The caller
            closes the descriptor.
        @raise OSError: the file is there but cannot be opened or read
            (C{PermissionError} for permissions).
        """
        found = self._openRegular(self._prefix + hexdigest)
        if found is None:
            layoutDir = os.path.join(self.path, "blobs", algorithm)
            if self._inside(os.path.realpath(layoutDir)):
                found = self._openRegular(os.path.join(layoutDir, hexdigest))
        return found

    def readable(self) -> bool:
        """
        Whether the directory can still be listed and entered.
        """
        return os.access(self.path, os.R_OK | os.X_OK)

    def _inside(self, realPath: str) -> bool:
        return realPath.startswith(self._realPath + os.sep)

    def _openRegular(
        self, path: str, followLink: bool = True
    ) -> tuple[int, os.stat_result] | None:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            if e.errno != errno.ELOOP:
                raise
            # A link, or a loop of links (realpath then stops at a link).
            target = os.path.realpath(path)
            if not followLink or not self._inside(target):
                return None
            return self._openRegular(target, followLink=False)
        try:
            status = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            return None
        return fd, status
