from twisted.application.service import ServiceMaker

nydusProxy = ServiceMaker(
    "nydus-proxy",
    "nydusproxy.tap",
    "Serve a directory of Nydus blobs to nydusd over the registry API.",
    "nydus-proxy",
)
