"""A private OpenLDAP server (Debian's slapd) for the people directory tests.

Its own slapd.conf in a temp dir (mdb backend, the schemas inetOrgPerson needs plus the
Active Directory attribute `department`), listening on a free 127.0.0.1 port in the
foreground: no system service, no system config. Anonymous clients see nothing; the desk
binds as its service account, as it would against Active Directory. Entries are added
with `ldapadd` (ldap-utils).
"""

from __future__ import annotations

import base64
import itertools
import subprocess
import time
from pathlib import Path

from servers import LOOPBACK, _find_binary, free_port, wait_for_port

INSTALL_HINT = (
    "install it with: apt-get update && "
    "DEBIAN_FRONTEND=noninteractive apt-get install -y slapd ldap-utils (or run scripts/test)"
)
SUFFIX = "dc=example,dc=test"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "admin-secret"
SERVICE_DN = f"cn=mailflow,{SUFFIX}"  # the desk's read-only bind account
SERVICE_PASSWORD = "service-secret"
SIZE_LIMIT = 3  # entries one search answer (or one page) may hold for a bound user
SCHEMAS = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")

CONFIG = """\
include {schemas}/core.schema
include {schemas}/cosine.schema
include {schemas}/inetorgperson.schema

# Active Directory's department (its OID), which inetOrgPerson lacks
attributetype ( 1.2.840.113556.1.2.141 NAME 'department'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.4203.666.11.90 NAME 'adUser' SUP top AUXILIARY
    MAY ( department ) )

pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath {modules}
moduleload back_mdb

database mdb
maxsize 33554432
suffix "{suffix}"
rootdn "{admin}"
rootpw {password}
directory {root}/data
# Like Active Directory's MaxPageSize (1000), a small cap: only a paged search sees everyone
limits users size.soft={size_limit} size.hard={size_limit} size.prtotal=unlimited
index objectClass,mail eq
access to attrs=userPassword by anonymous auth by * none
access to * by users read by * none
"""

_units = itertools.count(1)


def _ldif(dn: str, attributes: dict[str, str | list[str]]) -> str:
    """One LDIF record, every value base64 (any language, any character)."""
    lines = [f"dn:: {base64.b64encode(dn.encode()).decode()}"]
    for name, values in attributes.items():
        for value in [values] if isinstance(values, str) else values:
            lines.append(f"{name}:: {base64.b64encode(value.encode()).decode()}")
    return "\n".join(lines) + "\n\n"


class Slapd:
    """A private slapd on a free 127.0.0.1 port, seeded with the suffix and a service user."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.host = LOOPBACK
        self.port = 0
        self.conf = self.root / "slapd.conf"
        self.log = self.root / "slapd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    def start(self) -> None:
        """Write the config, start `slapd -f CONF -d 0` (foreground), wait for the port."""
        binary = _find_binary("slapd")
        if binary is None:
            raise RuntimeError(f"slapd is not installed; {INSTALL_HINT}")
        if _find_binary("ldapadd") is None:
            raise RuntimeError(f"ldapadd is not installed; {INSTALL_HINT}")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        self.conf.write_text(CONFIG.format(
            schemas=SCHEMAS, modules=MODULES, root=self.root, suffix=SUFFIX, admin=ADMIN_DN,
            password=ADMIN_PASSWORD, size_limit=SIZE_LIMIT,
        ))
        started = time.monotonic()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-f", str(self.conf), "-h", f"{self.url}/", "-d", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        if not wait_for_port(self.host, self.port, timeout=10):
            self.stop()
            raise RuntimeError(f"slapd did not open {self.url} within 10s: {self.log_tail()}")
        self.startup_seconds = time.monotonic() - started
        self.add(
            _ldif(SUFFIX, {"objectClass": ["dcObject", "organization"], "dc": "example",
                           "o": "Example Power Supply Bureau"})
            + _ldif(SERVICE_DN, {"objectClass": ["organizationalRole", "simpleSecurityObject"],
                                 "cn": "mailflow", "userPassword": SERVICE_PASSWORD})
        )

    def stop(self) -> None:
        """End the slapd we started (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def add(self, ldif: str) -> None:
        """ldapadd the records as the directory's administrator."""
        done = subprocess.run(
            [str(_find_binary("ldapadd")), "-x", "-H", self.url, "-D", ADMIN_DN,
             "-w", ADMIN_PASSWORD],
            input=ldif.encode(), capture_output=True, timeout=30, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ldapadd failed: {done.stderr.decode(errors='replace')}")

    def unit(self) -> str:
        """A fresh, empty organizational unit (one per test): its DN."""
        dn = f"ou=unit{next(_units)},{SUFFIX}"
        self.add(_ldif(dn, {"objectClass": "organizationalUnit", "ou": dn.split(",")[0][3:]}))
        return dn

    def add_person(self, unit: str, uid: str, **attributes: str | list[str]) -> str:
        """An AD-like user entry under `unit`: inetOrgPerson plus `department`."""
        dn = f"uid={uid},{unit}"
        attributes.setdefault("cn", uid)
        attributes.setdefault("sn", uid)
        self.add(_ldif(dn, {"objectClass": ["inetOrgPerson", "adUser"], "uid": uid,
                            **attributes}))
        return dn
