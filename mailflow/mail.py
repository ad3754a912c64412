"""Parse raw email bytes into a :class:`ParsedMail` without ever raising.

The stdlib ``compat32`` parser is used for speed; every header and body part is decoded
explicitly here so that wrong, missing or unknown charsets (very common in Chinese mail)
still give readable text.
"""

from __future__ import annotations

import binascii
import codecs
import email
import email.errors
import email.feedparser
import email.message
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import html2text

from mailflow.loops import automatic_reason

__all__ = [
    "Attachment",
    "ParsedMail",
    "decode_bytes",
    "decode_header_value",
    "html_to_text",
    "parse",
    "strip_quoted",
    "strip_subject_prefixes",
]


@dataclass
class Attachment:
    """One attachment; ``data`` is None when it was kept out (too big or too many)."""

    filename: str
    content_type: str
    size: int
    data: bytes | None


@dataclass
class ParsedMail:
    """A decoded email; see :func:`parse`."""

    message_id: str
    has_message_id: bool
    in_reply_to: list[str]
    references: list[str]
    from_addr: str
    from_name: str
    reply_to: list[str]
    to: list[str]
    cc: list[str]
    subject: str
    date: datetime | None
    text: str
    new_text: str
    attachments: list[Attachment]
    omitted: list[str]
    auto: str | None
    defects: list[str]
    raw_headers: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def header(self, name: str) -> str | None:
        """Decoded value of the first header called ``name`` (case-insensitive), or None."""
        key = name.lower()
        for hname, value in self.raw_headers:
            if hname.lower() == key:
                return decode_header_value(value)
        return None

    def header_all(self, name: str) -> list[str]:
        """Decoded values of every header called ``name`` (case-insensitive), in order."""
        key = name.lower()
        return [decode_header_value(v) for h, v in self.raw_headers if h.lower() == key]

    def addresses(self, name: str) -> list[str]:
        """Every address in the headers called ``name``, lowercased, in order, once each.

        Read from the raw values, as From and To are: a decoded display name may hold a
        comma ("Li, Si") that would split it into two addresses.
        """
        key = name.lower()
        values = [v for h, v in self.raw_headers if h.lower() == key]
        return list(dict.fromkeys(a for _, a in _addresses(values)))


# --------------------------------------------------------------------------- charsets

MESSAGE_ID_LIMIT = 490  # characters kept of a Message-ID (the columns hold 500)
NAME_LIMIT = 200  # characters kept of the sender's display name
SUBJECT_LIMIT = 1000  # characters kept of the subject (it is copied into every notice)
REFERENCES_LIMIT = 100  # the last References kept (RFC 5322 §3.6.4 allows trimming)
IN_REPLY_TO_LIMIT = 10  # the last In-Reply-To ids kept (one is usual)
ADDRESS_LIMIT = 100  # the first addresses kept of To, Cc and Reply-To each
DEFECTS_LIMIT = 50  # defects recorded per mail

_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "cp936": "gb18030",
    "x-gbk": "gb18030",
    "gb_2312-80": "gb18030",
    "gb_2312": "gb18030",
    "x-gb2312": "gb18030",
    "euc-cn": "gb18030",
    "chinese": "gb18030",
    "csgb2312": "gb18030",
    "ms936": "gb18030",
    "windows-936": "gb18030",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "cn-big5": "big5hkscs",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
    "ks_c_5601-1987": "cp949",
    "iso-8859-8-i": "iso-8859-8",
}
# Codecs that decode any byte string, so "strict" success proves nothing.
_LAX_CODECS = {
    "iso8859-1", "cp1252", "ascii", "iso8859-15", "iso8859-2", "cp1250",
}
# Codecs whose encoded form is (or may be) pure ASCII bytes that mean something else.
_ASCII_UNSAFE = ("utf-7", "utf_7", "hz", "iso2022", "utf-16", "utf_16", "utf-32", "utf_32")
_charset_cache: dict[str, str | None] = {}


def _codec_for(label: str | None) -> str | None:
    """Python codec name for a MIME charset label, or None when unknown."""
    if not label:
        return None
    key = label.strip().strip("\"'").lower()
    if key in _charset_cache:
        return _charset_cache[key]
    name = _CHARSET_ALIASES.get(key, key)
    try:
        codec: str | None = codecs.lookup(name).name
    except (LookupError, ValueError, TypeError):
        codec = None
    # Never let a mail pick a binary transform codec (base64, zlib, rot13 ...).
    if codec is not None:
        try:
            info = codecs.lookup(codec)
            if not getattr(info, "_is_text_encoding", True):
                codec = None
        except LookupError:
            codec = None
    if len(_charset_cache) < 1000:
        _charset_cache[key] = codec
    return codec


def _looks_gbk(data: bytes) -> bool:
    """True when the high bytes of ``data`` pair up like GB2312/GBK double-byte text.

    Chinese text is mostly GB2312's 3,755 common characters (lead byte B0–D7): at least
    half of the pairs must be those, so Latin-1 "Grüße" or "Solicitação", whose accented
    letters happen to pair up, keeps its label.
    """
    pairs = odd = common = 0
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        if i + 1 < n and 0x81 <= b <= 0xFE:
            t = data[i + 1]
            if t >= 0x80:
                pairs += 1
                common += 0xB0 <= b <= 0xD7 and t >= 0xA1
            else:
                odd += 1
            i += 2
        else:
            return False
    return pairs > 0 and odd * 5 <= pairs and common * 2 >= pairs


def decode_bytes(data: bytes, charset: str | None = None,
                 defects: list[str] | None = None) -> str:
    """Decode ``data`` labelled ``charset``; tries the label, UTF-8, GB18030, then replaces.

    Unknown labels are recorded in ``defects``. Never raises.
    """
    if not data:
        return ""
    if data.startswith(codecs.BOM_UTF8):  # a signature, not text: the data is UTF-8
        data, charset = data[len(codecs.BOM_UTF8) :], "utf-8"
    codec = _codec_for(charset) if charset else None
    if charset and codec is None and defects is not None and len(defects) < DEFECTS_LIMIT:
        note = f"unknown charset {charset.strip()[:40]!r}"
        if note not in defects:
            defects.append(note)
    if data.isascii() and (codec is None or not codec.startswith(_ASCII_UNSAFE)):
        return data.decode("ascii")
    if codec is not None and codec not in _LAX_CODECS:
        try:
            return data.decode(codec)
        except (UnicodeError, LookupError, ValueError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeError:
        pass
    if codec is None or codec not in _LAX_CODECS or _looks_gbk(data):
        try:
            return data.decode("gb18030")
        except UnicodeError:
            pass
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except (UnicodeError, LookupError, ValueError):
            pass
    return data.decode("utf-8", "replace")


def _raw_str_bytes(value: str) -> bytes:
    """Bytes behind a header string from the parser (8-bit bytes arrive as surrogates)."""
    try:
        return value.encode("ascii", "surrogateescape")
    except UnicodeError:
        return value.encode("utf-8", "surrogateescape")


def _fix_raw(value: str) -> str:
    """Decode raw 8-bit text hiding in ``value`` as surrogate escapes."""
    if value.isascii():
        return value
    return decode_bytes(_raw_str_bytes(value))


# --------------------------------------------------------------------------- headers

_PARAM_MARKS = re.compile(r'\\"|[";]')


def _split_params(value: str) -> list[tuple[str, str]]:
    """(name, value) of each `;`-separated part of a Content-Type or Content-Disposition
    value, as the stdlib reads them, in linear time: a `;` inside quotes does not split.

    Python 3.11's own reader copies the rest of the value at each `;` and counts the
    quotes before it from the start: quadratic in a value of many parameters or quotes.
    """
    pieces: list[str] = []
    start, quoted = 0, False
    for m in _PARAM_MARKS.finditer(value):
        if m.group() == '"':
            quoted = not quoted
        elif m.group() == ";" and not quoted:
            pieces.append(value[start : m.start()])
            start = m.end()
    pieces.append(value[start:])
    params: list[tuple[str, str]] = []
    for piece in pieces:
        name, eq, val = piece.partition("=")
        params.append((name.strip().lower(), val.strip()) if eq else (piece.strip(), ""))
    return params


class _Message(email.message.Message):
    """The compat32 message, its header parameters read in linear time (_split_params)."""

    def _get_params_preserve(self, failobj: object, header: str) -> object:
        value = self.get(header, None)
        if value is None:
            return failobj
        return email.utils.decode_params(_split_params(str(value)))


_EW_RE = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?]*?)\?=")
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])|\r?\n")
_WS_RE = re.compile(r"\s+")


def _b64(text: str) -> bytes:
    """Lenient base64 decode (missing or bad padding is tolerated)."""
    raw = re.sub(r"[^A-Za-z0-9+/]", "", text)
    raw = raw[: len(raw) - (len(raw) % 4 == 1)]
    return binascii.a2b_base64(raw + "=" * (-len(raw) % 4))


def _ew_bytes(enc: str, text: str) -> bytes:
    if enc in "bB":
        return _b64(text)
    return binascii.a2b_qp(_raw_str_bytes(text), header=True)


def decode_header_value(value: str | None) -> str:
    """Decode an RFC 2047 header value (and raw 8-bit UTF-8/GBK); never raises."""
    if not value:
        return ""
    try:
        value = str(value)
        value = _FOLD_RE.sub("", value)
        if "=?" not in value:
            return _fix_raw(value)
        out: list[str] = []
        buf = bytearray()  # consecutive encoded words of one charset, decoded together
        buf_cs: str | None = None
        pos = 0
        for m in _EW_RE.finditer(value):
            gap = value[pos:m.start()]
            if gap and not (pos > 0 and gap.isspace()):
                if buf_cs is not None:
                    out.append(decode_bytes(bytes(buf), buf_cs))
                    buf, buf_cs = bytearray(), None
                out.append(_fix_raw(gap))
            charset = m.group(1).split("*", 1)[0]
            try:
                chunk = _ew_bytes(m.group(2), m.group(3))
            except (binascii.Error, ValueError):
                if buf_cs is not None:
                    out.append(decode_bytes(bytes(buf), buf_cs))
                    buf, buf_cs = bytearray(), None
                out.append(m.group(0))
                pos = m.end()
                continue
            if buf_cs is not None and buf_cs.lower() != charset.lower():
                out.append(decode_bytes(bytes(buf), buf_cs))
                buf = bytearray()
            buf_cs = charset
            buf += chunk
            pos = m.end()
        if buf_cs is not None:
            out.append(decode_bytes(bytes(buf), buf_cs))
        out.append(_fix_raw(value[pos:]))
        return "".join(out)
    except Exception:  # a header must never break parsing
        return str(value).encode("utf-8", "replace").decode("utf-8", "replace")


_MSGID_RE = re.compile(r"<([^<>\s]+)>")


def _msgids(value: str | None) -> list[str]:
    """Message ids in a References/In-Reply-To/Message-ID value, without angle brackets."""
    if not value:
        return []
    value = _fix_raw(value)
    ids = _MSGID_RE.findall(value)
    if ids:
        return ids
    return [t.strip("<>") for t in re.split(r"[\s,]+", value) if t.strip("<>") and "@" in t]


def _last_ids(ids: list[str], limit: int) -> list[str]:
    """The last `limit` ids, each cut as stored Message-IDs are (so that they still match)."""
    return [i[:MESSAGE_ID_LIMIT] for i in ids[-limit:]]


# One plain address, the value unfolded: `"Name" <a@b>`, `Name <a@b>`, `<a@b>` or `a@b`
# (others use getaddresses). No two parts may match the same spaces: over a long run of
# whitespace such a pattern backtracks in cubic time.
_SIMPLE_ADDR_RE = re.compile(
    r'(?:"([^"\\]*)" ?|([^"<>,;:()@\\\[\] ]*+(?: [^"<>,;:()@\\\[\] ]++)*+) ?)?'
    r'<([^<>\s,;:"()\\@]+@[A-Za-z0-9.-]+)>'
    r'|([^<>\s,;:"()\\@]+@[A-Za-z0-9.-]+)'
)


def _unfold(value: str) -> str:
    """A header value on one line, every run of whitespace one space, trimmed."""
    return _WS_RE.sub(" ", value).strip()


def _addresses(values: list[str], limit: int | None = None) -> list[tuple[str, str]]:
    """(decoded display name, bare lowercased address) pairs from address headers; the
    first `limit` of them when given."""
    result: list[tuple[str, str]] = []
    if not values:
        return result
    values = [_unfold(v) for v in values]
    if len(values) == 1:
        m = _SIMPLE_ADDR_RE.fullmatch(values[0])
        if m:
            name = m.group(1) if m.group(1) is not None else (m.group(2) or "")
            addr = _fix_raw(m.group(3) or m.group(4)).lower()  # 8-bit bytes: no surrogates
            return [(_WS_RE.sub(" ", decode_header_value(name.strip())).strip(), addr)]
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:  # malformed address lists
        pairs = []
    for name, addr in pairs:
        addr = _fix_raw(addr).strip().strip("<>").lower()
        if not addr or any(c.isspace() for c in addr):
            continue
        result.append((_WS_RE.sub(" ", decode_header_value(name)).strip(), addr))
        if limit is not None and len(result) >= limit:
            break
    return result


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(_fix_raw(value).strip())
    except Exception:  # garbage dates are common
        return None
    if dt is None:
        return None
    try:
        if dt.tzinfo is None:
            return dt.replace(tzinfo=UTC)
        return dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


# Possessive spaces (`\s*+`): no two parts may match the same run of whitespace.
_PREFIX_RE = re.compile(
    r"^(?:\s*+(?:(?:re|fw|fwd|aw|wg|sv|vs|antw|antwort|tr|rv|res|enc|odp|pd|ynt|vb|vl|"
    r"回复|答复|转发|回覆|答覆|轉寄|轉發|转寄)\s*+(?:(?:\[\d+\]|\(\d+\))\s*+)?[:：]|"
    r"\[(?:fwd?|re)\]\s*+[:：]?))+\s*",
    re.IGNORECASE,
)


def strip_subject_prefixes(subject: str) -> str:
    """Remove (nested) reply/forward prefixes such as ``Re: 回复： Fwd:`` from a subject."""
    return _PREFIX_RE.sub("", subject or "", count=1).strip()


# --------------------------------------------------------------------------- quoted text

# Every run of spaces is matched possessively (`\s*+`) by one part of a pattern: where two
# parts could share a run ("From" + 40,000 spaces), matching backtracks in quadratic time.
_ORIG_RE = re.compile(
    r"^\s*+-{2,}+\s*+(?:原始邮件|原始郵件|Original Message|Ursprüngliche Nachricht|"
    r"Message d'origine|Mensaje original)\s*+-{2,}+\s*+$",
    re.IGNORECASE,
)
_HDR_FROM_RE = re.compile(
    r"^\s*+\*{0,2}(?:From|发件人|寄件者|寄件人|Von|De)\s*+(?:\*{1,2}\s*+)?[:：]", re.IGNORECASE
)
_HDR_NEXT_RE = re.compile(
    r"^\s*+\*{0,2}(?:Sent|Date|发送时间|日期|时间|寄件日期|Gesendet|Datum|Envoyé|Enviado)"
    r"\s*+(?:\*{1,2}\s*+)?[:：]",
    re.IGNORECASE,
)
_HDR_MID_RE = re.compile(
    r"^\s*+\*{0,2}(?:To|Cc|Subject|收件人|抄送|主题|An|Betreff)\s*+(?:\*{1,2}\s*+)?[:：]", re.I
)
_WROTE_END_RE = re.compile(
    r"(?:wrote|写道|寫道|schrieb|a écrit|escribió)\s*+[:：]\s*+$", re.IGNORECASE
)
_WROTE_START_RE = re.compile(r"^\s*+(?:On\s|在|Am\s|Le\s|El\s)", re.IGNORECASE)
_UNDERSCORES_RE = re.compile(r"^\s*+_{10,}+\s*+$")


def _wrote_cut(lines: list[str], i: int) -> int | None:
    """Index where an attribution line ("On … wrote:", "在 … 写道：") begins, if line i ends one."""
    line = lines[i]
    if not _WROTE_END_RE.search(line):
        return None
    if _WROTE_START_RE.match(line) or "于" in line:
        if len(line) < 400 and any(c.isdigit() or c == "@" for c in line):
            return i
        return None
    j = i - 1
    if j >= 0 and lines[j].strip():
        both = lines[j] + " " + line
        if (_WROTE_START_RE.match(lines[j]) or "于" in lines[j]) and len(both) < 400 and any(
            c.isdigit() or c == "@" for c in both
        ):
            return j
    return None


# First characters of lines that may start quoted history (cheap pre-check before regexes).
_CANDIDATE_FIRST = frozenset(">-_*FfVvDd发寄")


def _cut_at(lines: list[str], i: int) -> int | None:
    """Index where quoted history starts if line ``i`` begins (or ends) an attribution."""
    line = lines[i]
    s = line.strip()
    if s.startswith(">") or line in ("-- ", "--") or _ORIG_RE.match(line):
        return i
    w = _wrote_cut(lines, i)
    if w is not None:
        return w
    n = len(lines)
    if _HDR_FROM_RE.match(line):
        k, seen = i + 1, 0
        while k < n and seen < 5:
            if lines[k].strip():
                seen += 1
                if _HDR_NEXT_RE.match(lines[k]):
                    return i
                if not _HDR_MID_RE.match(lines[k]):
                    return None
            k += 1
        return None
    if _UNDERSCORES_RE.match(line):
        k = i + 1
        while k < n and not lines[k].strip():
            k += 1
        if k < n and _HDR_FROM_RE.match(lines[k]):
            return i
    return None


def strip_quoted(text: str) -> str:
    """Return the new part of a reply: quoted history and everything after it removed."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    cut = len(lines)
    for i, line in enumerate(lines):
        s = line.strip()
        if s and (s[0] in _CANDIDATE_FIRST or s[-1] in ":：") or line == "-- ":
            found = _cut_at(lines, i)
            if found is not None:
                cut = found
                break
    kept = lines[:cut]
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept)


# --------------------------------------------------------------------------- bodies

_MD_ESCAPE_RE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_MD_TABLE_RULE_RE = re.compile(r"^[ \t]*+-{3,}+(?:\|-{3,}+)++[ \t]*+$", re.MULTILINE)
_BLANKS_RE = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    """Readable plain text from an HTML body (no link or image markup)."""
    h = html2text.HTML2Text()
    h.ignore_images = True
    h.ignore_links = True
    h.ignore_emphasis = True
    h.unicode_snob = True
    h.body_width = 0
    h.single_line_break = False
    out = h.handle(html).replace("\xa0", " ")
    out = _MD_ESCAPE_RE.sub(r"\1", out)
    out = _MD_TABLE_RULE_RE.sub("", out)
    out = "\n".join(line.rstrip() for line in out.split("\n"))
    return _BLANKS_RE.sub("\n\n", out).strip("\n")


def human_size(size: int) -> str:
    """312 bytes, 120 KB, 1.5 MB, 29 MB."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    mb = size / (1024 * 1024)
    return f"{mb:.1f} MB" if mb < 10 else f"{mb:.0f} MB"


def _param(part: email.message.Message, name: str, header: str = "content-type") -> str:
    """A decoded (RFC 2231 or RFC 2047, or raw 8-bit) Content-Type/Content-Disposition
    parameter."""
    raw = next((v for k, v in part.raw_items() if k.lower() == header), None)
    if isinstance(raw, str) and not raw.isascii():
        # Raw 8-bit bytes (e.g. filename="故障截图.png" in UTF-8 or GBK): get_param would
        # turn them into U+FFFD, so they are decoded first, as other raw headers are.
        holder = _Message()
        holder[header] = _fix_raw(raw)
        part = holder
    try:
        val = part.get_param(name, None, header=header)
    except Exception:
        return ""
    if val is None:
        return ""
    if isinstance(val, tuple):
        charset, _lang, text = val
        raw = _raw_str_bytes(text) if text.isascii() else text.encode("latin-1", "replace")
        return decode_bytes(raw, charset or None)
    return decode_header_value(email.utils.unquote(str(val))).strip()


def _filename(part: email.message.Message) -> str:
    return _param(part, "filename", "content-disposition") or _param(part, "name")


def _decoded_payload(part: email.message.Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # broken transfer encoding
        data = None
    if isinstance(data, bytes):
        payload = part.get_payload()
        if isinstance(payload, str) and any(
            isinstance(d, email.errors.InvalidBase64LengthDefect) for d in part.defects
        ):  # the stdlib hands such base64 back undecoded: decode what there is
            return _b64(payload)
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return _raw_str_bytes(payload)
    return b""


def _message_bytes(part: email.message.Message) -> bytes:
    """Serialized content of a message/* part whose payload the parser split into messages."""
    payload = part.get_payload()
    chunks: list[bytes] = []
    for sub in payload if isinstance(payload, list) else []:
        try:
            chunks.append(sub.as_bytes())
        except Exception:
            try:
                chunks.append(_raw_str_bytes(sub.as_string()))
            except Exception:
                continue
    return b"\n".join(chunks)


_BOUNDARY_GUESS_RE = re.compile(rb"^--([^\s]{1,200})\s*\r?\n(?=[A-Za-z-]+:)", re.MULTILINE)


_Piece = tuple[str, email.message.Message]


class _Walker:
    """Collects text pieces and attachments from a message tree."""

    def __init__(self, mail: ParsedMail, max_bytes: int, max_count: int, max_chars: int):
        self.mail = mail
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.max_chars = max_chars
        self.kept_out = 0
        self.texts: dict[int, str] = {}

    def defect(self, note: str) -> None:
        if note not in self.mail.defects and len(self.mail.defects) < 50:
            self.mail.defects.append(note)

    def note_defects(self, part: email.message.Message) -> None:
        for d in getattr(part, "defects", ()) or ():
            self.defect(f"broken MIME: {type(d).__name__}")

    def text_of(self, part: email.message.Message, html: bool) -> str:
        data = _decoded_payload(part)
        try:
            charset = part.get_param("charset")
        except Exception:
            charset = None
        if isinstance(charset, tuple):
            charset = charset[2]
        text = decode_bytes(data, str(charset) if charset else None, self.mail.defects)
        if html:
            limit = self.max_chars * 5
            if len(text) > limit:
                text = text[:limit]
                self.mail.omitted.append(f"HTML body cut to {limit} characters before conversion")
            try:
                text = html_to_text(text)
            except Exception:  # html2text on hostile markup
                self.defect("HTML conversion failed")
                text = re.sub(r"<[^>]*>", " ", text)
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def add_attachment(self, part: email.message.Message, ctype: str, name: str = "") -> None:
        data = _message_bytes(part) if part.is_multipart() else _decoded_payload(part)
        if not name and ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                subj = decode_header_value(payload[0].get("subject", "") or "")
                name = f"{_WS_RE.sub(' ', subj).strip()}.eml" if subj.strip() else ""
        size = len(data)
        att = Attachment(filename=name, content_type=ctype, size=size, data=data)
        if size > self.max_bytes:
            att.data = None
            self.mail.omitted.append(f"{name or 'unnamed attachment'} ({human_size(size)})")
        elif len(self.mail.attachments) >= self.max_count:
            att.data = None
            self.kept_out += 1
        self.mail.attachments.append(att)


    def text(self, piece: _Piece) -> str:
        """Decoded (and for HTML converted) text of a body piece, computed once."""
        key = id(piece[1])
        if key not in self.texts:
            self.texts[key] = self.text_of(piece[1], piece[0] == "html")
        return self.texts[key]

    def walk(self, part: email.message.Message, depth: int = 0) -> list[_Piece]:
        """Body pieces as (subtype, part) under ``part``; attachments are collected on the way."""
        self.note_defects(part)
        if depth > 40:
            self.defect("MIME nesting too deep")
            return []
        ctype = part.get_content_type()
        maintype = ctype.split("/", 1)[0]
        if maintype == "multipart":
            payload = part.get_payload()
            if not isinstance(payload, list):
                repaired = self.repair(part)
                if repaired is None:
                    return [("plain", part)]
                part, payload = repaired, repaired.get_payload()
            subs = [p for p in payload if isinstance(p, email.message.Message)]
            if part.get_content_subtype() == "alternative":
                return self.alternative(subs, depth)
            pieces: list[_Piece] = []
            for sub in subs:
                pieces.extend(self.walk(sub, depth + 1))
            return pieces
        if part.is_multipart() or maintype == "message":
            self.add_attachment(part, ctype, _filename(part))
            return []
        name = _filename(part)
        if (ctype in ("text/plain", "text/html") and not name
                and part.get_content_disposition() != "attachment"):
            return [(part.get_content_subtype(), part)]
        self.add_attachment(part, ctype, name)
        return []

    def alternative(self, subs: list[email.message.Message], depth: int) -> list[_Piece]:
        """Pick the best rendering of multipart/alternative: plain text if it has any."""
        options = [self.walk(sub, depth + 1) for sub in subs]
        for opt in options:
            if opt and all(kind == "plain" for kind, _ in opt) and any(
                self.text(p).strip() for p in opt
            ):
                return opt
        for opt in options:
            if any(kind == "html" for kind, _ in opt):
                return opt
        for opt in reversed(options):
            if opt:
                return opt
        return []

    def repair(self, part: email.message.Message) -> email.message.Message | None:
        """Re-parse a multipart whose boundary parameter is missing by guessing it."""
        self.defect("broken MIME: multipart without usable boundary")
        body = _decoded_payload(part)
        m = _BOUNDARY_GUESS_RE.search(body)
        if not m:
            return None
        boundary = m.group(1).decode("ascii", "replace").replace('"', "")
        head = f'Content-Type: {part.get_content_type()}; boundary="{boundary}"\n\n'
        fixed = email.message_from_bytes(
            head.encode() + body, _class=_Message, policy=email.policy.compat32
        )
        return fixed if isinstance(fixed.get_payload(), list) else None


# --------------------------------------------------------------------------- parse


def _as_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _fallback_id(raw: bytes) -> str:
    return f"sha256-{hashlib.sha256(raw).hexdigest()}@mailflow.invalid"


def _empty(raw: bytes) -> ParsedMail:
    return ParsedMail(
        message_id="",
        has_message_id=False, in_reply_to=[], references=[], from_addr="", from_name="",
        reply_to=[], to=[], cc=[], subject="", date=None, text="", new_text="",
        attachments=[], omitted=[], auto=None, defects=[],
    )


def parse(raw: bytes, *, max_attachment_bytes: int = 10_000_000, max_attachments: int = 20,
          max_text_chars: int = 200_000, desk_marker: str = "X-Mailflow") -> ParsedMail:
    """Parse raw message bytes into a :class:`ParsedMail`. Never raises for any input.

    ``desk_marker`` names the header our own outgoing mail carries (see loops).
    """
    data = _as_bytes(raw)
    mail = _empty(data)
    try:
        _fill(mail, data, max_attachment_bytes, max_attachments, max_text_chars, desk_marker)
    except Exception as exc:  # parse() must never raise
        mail.defects.append(f"parse failed: {type(exc).__name__}")
        if not mail.text:
            mail.text = decode_bytes(data[: max_text_chars * 4])[:max_text_chars]
            mail.new_text = mail.text
    if not mail.message_id:
        mail.message_id, mail.has_message_id = _fallback_id(data), False
    return mail


def _fill(mail: ParsedMail, data: bytes, max_bytes: int, max_count: int, max_chars: int,
          desk_marker: str) -> None:
    if not data.strip():
        mail.defects.append("empty message")
        return
    msg = _message_from_bytes(data)
    headers = [(str(k), v if isinstance(v, str) else str(v)) for k, v in msg.raw_items()]
    mail.raw_headers = headers
    first: dict[str, str] = {}
    every: dict[str, list[str]] = {}
    for k, v in headers:
        lk = k.lower()
        first.setdefault(lk, v)
        every.setdefault(lk, []).append(v)
    if not headers:
        mail.defects.append("no headers")

    ids = _msgids(first.get("message-id"))
    if ids:
        mail.message_id, mail.has_message_id = ids[0].strip()[:MESSAGE_ID_LIMIT], True
    mail.in_reply_to = _last_ids(_msgids(first.get("in-reply-to")), IN_REPLY_TO_LIMIT)
    references = [i for v in every.get("references", []) for i in _msgids(v)]
    mail.references = _last_ids(references, REFERENCES_LIMIT)

    from_pairs = _addresses(every.get("from", []), 1)
    if from_pairs:
        mail.from_name, mail.from_addr = from_pairs[0]
        mail.from_name = mail.from_name[:NAME_LIMIT].rstrip()
    mail.reply_to = [a for _, a in _addresses(every.get("reply-to", []), ADDRESS_LIMIT)]
    mail.to = [a for _, a in _addresses(every.get("to", []), ADDRESS_LIMIT)]
    mail.cc = [a for _, a in _addresses(every.get("cc", []), ADDRESS_LIMIT)]
    subject = _WS_RE.sub(" ", decode_header_value(first.get("subject"))).strip()
    mail.subject = subject[:SUBJECT_LIMIT].rstrip()
    mail.date = _parse_date(first.get("date"))

    walker = _Walker(mail, max_bytes, max_count, max_chars)
    pieces = walker.walk(msg)
    texts = (walker.text(p) for p in pieces)
    text = "\n\n".join(t.strip("\n") for t in texts if t.strip())
    if len(text) > max_chars:
        mail.omitted.append(f"text truncated to {max_chars} of {len(text)} characters")
        text = text[:max_chars]
    mail.text = text
    mail.new_text = strip_quoted(text)
    if walker.kept_out:
        mail.omitted.append(
            f"{walker.kept_out} attachment(s) not kept (limit {max_count} attachments)"
        )

    try:
        mail.auto = automatic_reason(msg, mail.subject, desk_marker)
    except Exception:
        mail.defects.append("automatic-mail check failed")


def _message_from_bytes(data: bytes) -> email.message.Message:
    """email.message_from_bytes (with `_Message`, whose parameters read in linear time), fed
    in pieces: that one reads the whole mail through a StringIO of four bytes a character
    (a 23 MB mail peaked at 182 MB, this at 43 MB)."""
    parser = email.feedparser.BytesFeedParser(_Message, policy=email.policy.compat32)
    for start in range(0, len(data), _FEED_PIECE):
        parser.feed(data[start : start + _FEED_PIECE])
    return parser.close()


_FEED_PIECE = 1 << 16
