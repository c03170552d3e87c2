"""The hostile request targets and Host headers of the differential suite, generated
combinatorially from small alphabets (segments, separators and their escapes, spellings of `..`, of
`admin` and of `admin.example.com`) plus a hand-written list of the published tricks.

Every case is raw bytes: the request target exactly as it goes on the wire after `GET `, and the
Host header's value exactly as it follows `Host:`. Nothing here is normalised, quoted or validated;
that is the point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

DEFAULT_HOST = b"api.example.com"
ADMIN_HOST = "admin.example.com"


@dataclass(frozen=True)
class Case:
    family: str
    target: bytes
    host: bytes = DEFAULT_HOST
    headers: bytes = b""  # extra header lines, each ending in CRLF

    def wire(self) -> bytes:
        """The request as sent (HTTP/1.1, one request per connection)."""
        return (
            b"GET " + self.target + b" HTTP/1.1\r\nHost: " + self.host + b"\r\n" + self.headers
            + b"User-Agent: adversarial-differential\r\nConnection: close\r\n\r\n"
        )


# Things that some parser, decoder or file system may take for a `/`.
SEPARATORS = [
    "/", "//", "%2F", "%2f", "%252F", "%25252F", "\\", "%5C", "%5c", "%255C",
    "%C0%AF",            # overlong UTF-8 `/` (2 bytes)
    "%E0%80%AF",         # overlong UTF-8 `/` (3 bytes)
    "%EF%BC%8F",         # U+FF0F FULLWIDTH SOLIDUS (NFKC: `/`)
    "%E2%88%95",         # U+2215 DIVISION SLASH
    ";/", "%3B/",
]

# Things that some parser, decoder or file system may take for a `..` segment.
DOTDOTS = [
    "..", "%2E%2E", "%2e%2e", ".%2E", "%252E%252E",
    "%C0%AE%C0%AE",      # overlong UTF-8 `.`
    "%EF%BC%8E%EF%BC%8E",  # U+FF0E FULLWIDTH FULL STOP twice (NFKC: `..`)
    "..;", "..%3B", "..%00", "..%09", "...",
]

# Spellings of the protected `admin` segment.
ADMIN_SPELLINGS = [
    "admin", "%61dmin", "ad%6Din", "ADMIN", "Admin", "admin%00", "admin;x", "admin%3Bx", "admin.",
    "admin%2E", "admin%20", "admin%09", "%EF%BD%81dmin",  # U+FF41 FULLWIDTH LATIN SMALL LETTER A
    "adm%C4%B1n",  # dotless i
]

SEGMENTS = ["public", "admin", ".", "..", "", "secret"]

HOST_BASES = [
    "admin.example.com", "ADMIN.EXAMPLE.COM", "Admin.Example.Com", "%61dmin.example.com",
    "\uff41\uff44\uff4d\uff49\uff4e.example.com",   # full-width `admin` (IDNA/NFKC maps it to ASCII)
    "admin\u3002example\u3002com",                   # U+3002 IDEOGRAPHIC FULL STOP (IDNA: a dot)
    "admin\uff0eexample\uff0ecom",                   # U+FF0E FULLWIDTH FULL STOP
    "adm\u0131n.example.com",                        # dotless i
]
HOST_TRAILERS = ["", ".", ".."]
HOST_PORTS = ["", ":443", ":0", ":", ":65536"]
HOST_LEADERS = ["", " ", "\t", "x@", "x:y@"]


def _b(s: str) -> bytes:
    return s.encode("utf-8")


def traversal_cases() -> list[Case]:
    """`/<open API><sep><..><sep>admin/secret`: a way out of an open prefix into the protected one."""
    out = []
    for prefix, dotdot, j1, j2 in itertools.product(["public", "open"], DOTDOTS, SEPARATORS, SEPARATORS):
        # Mixed separators only next to a plain `/`, and only out of `/public`.
        if j1 != j2 and ("/" not in (j1, j2) or prefix != "public"):
            continue
        out.append(Case("traversal", _b(f"/{prefix}{j1}{dotdot}{j2}admin/secret")))
    # Index documents (a directory's listing or index.html leaks as much as a file).
    for dotdot, sep in itertools.product(DOTDOTS, SEPARATORS):
        out.append(Case("traversal-index", _b(f"/public{sep}{dotdot}{sep}admin{sep}")))
        out.append(Case("traversal-root", _b(f"/public{sep}{dotdot}{sep}secret")))
    return out


def spelling_cases() -> list[Case]:
    """The protected segment spelled differently, directly and after a traversal."""
    out = []
    for spelling in ADMIN_SPELLINGS:
        out.append(Case("spelling", _b(f"/{spelling}/secret")))
        for sep in ["/", "%2F", "%5C", ";/"]:
            out.append(Case("spelling-traversal", _b(f"/public{sep}..{sep}{spelling}/secret")))
    return out


def segment_cases() -> list[Case]:
    """Every sequence of up to three segments from SEGMENTS (with `.`, `..` and empty ones) before
    `/secret` and before a trailing `/`."""
    out = []
    for n in range(1, 4):
        for seq in itertools.product(SEGMENTS, repeat=n):
            path = "/" + "/".join(seq)
            out.append(Case("segments", _b(path + "/secret")))
            out.append(Case("segments-index", _b(path + "/")))
    return out


def host_cases() -> list[Case]:
    """Spellings of `admin.example.com` (a host-bound API that requires a key) in the Host header,
    with paths that an open API would allow on any other host."""
    out = []
    for base, trailer, port, leader in itertools.product(HOST_BASES, HOST_TRAILERS, HOST_PORTS, HOST_LEADERS):
        host = _b(f"{leader}{base}{trailer}{port}")
        # Fewer paths for the rarer shapes: the bound is a few thousand requests in total.
        paths = ["/open/secret", "/public/secret"] if (port in ("", ":443") and leader in ("", "x@")) else ["/open/secret"]
        for path in paths:
            out.append(Case("host", _b(path), host))
    return out


HAND_WRITTEN: list[Case] = [
    # The published hole: an open prefix, an encoded slash, a protected file.
    Case("hand", b"/public/..%2Fadmin/secret"),
    Case("hand", b"/public%2F..%2Fadmin%2Fsecret"),
    Case("hand", b"/public/..%2F..%2Fadmin/secret"),
    Case("hand", b"/public/%2e%2e%2fadmin/secret"),
    Case("hand", b"/public/..%5Cadmin/secret"),
    Case("hand", b"/public/..\\admin/secret"),
    Case("hand", b"/public/..;/admin/secret"),              # Tomcat/Spring path parameter
    Case("hand", b"/public;/../admin/secret"),
    Case("hand", b"/public;x=1/../admin/secret"),
    Case("hand", b"/public/..%252Fadmin/secret"),           # double encoding
    Case("hand", b"/public/%C0%AE%C0%AE/admin/secret"),     # overlong UTF-8
    Case("hand", b"/public/..%C0%AFadmin/secret"),
    Case("hand", b"/public/..%00/admin/secret"),
    Case("hand", b"/public/%00/../admin/secret"),
    Case("hand", b"/public/\xff/../admin/secret"),          # raw invalid UTF-8
    Case("hand", b"/public/%FF/../admin/secret"),
    Case("hand", b"/public/\xc3\xa9/../admin/secret"),      # raw non-ASCII (valid UTF-8)
    Case("hand", b"/public/..%09/admin/secret"),
    Case("hand", b"/public/..\t/admin/secret"),             # raw tab inside the request line
    Case("hand", b"/public/%0A/../admin/secret"),
    Case("hand", b"/public/%0D%0A/../admin/secret"),
    Case("hand", b"/public/secret#/../../admin/secret"),    # raw fragment
    Case("hand", b"/public/%23/../admin/secret"),
    Case("hand", b"/public/secret?/../../admin/secret"),
    Case("hand", b"/public/..%2F"),                         # the root's index
    Case("hand", b"/public/..%2Fsecret"),
    Case("hand", b"/open/..%2Fadmin/"),
    Case("hand", b"//admin/secret"),
    Case("hand", b"/%2Fadmin/secret"),
    Case("hand", b"/./admin/secret"),
    Case("hand", b"/public/%2E%2E/%2E%2E/admin/secret"),
    Case("hand", b"/public/.%2e/admin/secret"),
    Case("hand", b"/PUBLIC/../admin/secret"),
    Case("hand", b"/public/\xef\xbc\x8f..\xef\xbc\x8fadmin/secret"),   # raw U+FF0F
    Case("hand", b"/public\xef\xbc\x8f..\xef\xbc\x8fadmin\xef\xbc\x8fsecret"),
    Case("hand", b"/public/..\xc0\xafadmin/secret"),        # raw overlong bytes
    # Absolute-form targets: the authority comes from the target, not from Host.
    Case("hand", b"http://api.example.com/public/..%2Fadmin/secret"),
    Case("hand", b"http://admin.example.com./open/secret"),
    Case("hand", b"http://admin.example.com:443/open/secret"),
    Case("hand", b"http://x@admin.example.com/open/secret"),
    Case("hand", b"http://ADMIN.example.com./open/secret", b"admin.example.com"),
    # Forms that are not origin-form paths at all.
    Case("hand", b"*"),
    Case("hand", b"admin/secret"),
    Case("hand", b"../admin/secret"),
    Case("hand", b"%2Fadmin/secret"),
]


def corpus() -> list[Case]:
    """Every case, deduplicated, in a stable order."""
    seen: set[tuple[bytes, bytes]] = set()
    out = []
    for case in itertools.chain(HAND_WRITTEN, traversal_cases(), spelling_cases(), segment_cases(), host_cases()):
        key = (case.target, case.host)
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


if __name__ == "__main__":
    import collections

    cases = corpus()
    print(len(cases), dict(collections.Counter(c.family for c in cases)))
