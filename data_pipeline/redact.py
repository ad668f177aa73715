"""Redaction of personal data and secrets before tokenizing (as StarCoder's PII pipeline does, with patterns).

Five kinds, each replaced by a placeholder, counted, and switchable (``redact.*``):

- ``private_key``: a PEM block ``-----BEGIN [..] PRIVATE KEY-----`` ... ``-----END [..] PRIVATE KEY-----`` (the whole
  block, even when it is split across string literals or escaped ``\\n``), public keys and certificates are kept;
- ``api_key``: tokens of a known shape (AWS ``AKIA``/``ASIA`` access key ids, GitHub ``ghp_``/``gho_``/``ghu_``/``ghs_``/
  ``ghr_`` and ``github_pat_`` tokens, Slack ``xox[baprs]-``, Google ``AIza``), and high-entropy string literals
  assigned to a name holding *key*, *secret* or *token* (at least 16 characters of letters and digits both, entropy at
  least 3.5 bits per character, not purely hexadecimal: hex literals there are test vectors and digests);
- ``password``: a string literal assigned to a name holding *password*, *passwd* or *pwd*, in every HumanEval-X
  language's syntax (``=``, Go's ``:=``, ``:`` of object literals, keyword arguments), unless it is empty, holds a space,
  is a template (``$``, ``{``, ``<``, ``%``) or a known dummy (``password``, ``changeme``, ``***`` ...);
- ``email``: ``local@domain.tld``, except the reserved example domains of RFC 2606 (``example.com``, ``.example``,
  ``.test``, ``.invalid``, ``localhost``), which name nobody;
- ``ip_address``: IPv4 and IPv6 addresses that are globally routable (private, loopback, link-local, multicast,
  reserved and documentation ranges are kept: ``127.0.0.1`` or ``192.168.0.1`` identify no one), and not a version or
  section number: an IPv4-shaped string within 40 characters after *version*, *ver*, *section*, *clause*, *par*,
  *per*, *jls*, *jvms*, *oid*, ``C++NN``, ``§`` or ``[`` on its line, followed by ``]``, or heading a comment line
  (``// 27.4.4.1 basic_ios``) is kept.

Only the secret's characters are replaced: quotes, names and operators stay, so the code still parses. The passes run
in the order above (a token inside an assignment counts once, as ``api_key``), each only when a cheap substring test
says it can match.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass

from common.config import option
from data_pipeline.documents import Document

KINDS = ("private_key", "api_key", "password", "email", "ip_address")


@dataclass
class RedactConfig:
    """What is redacted from every document before tokenizing, and its placeholders."""

    enabled: bool = option(True, "redact personal data and secrets before dedup, decontamination and tokenizing")
    private_keys: bool = option(True, "PEM private key blocks")
    api_keys: bool = option(True, "AWS, GitHub, Slack, Google tokens, and high-entropy literals assigned to *key*, "
                            "*secret*, *token* names")
    passwords: bool = option(True, "string literals assigned to *password*, *passwd*, *pwd* names")
    emails: bool = option(True, "e-mail addresses (not at RFC 2606 example domains)")
    ip_addresses: bool = option(True, "globally routable IPv4 and IPv6 addresses (not version numbers)")
    private_key_placeholder: str = option("<PRIVATE_KEY>", "replaces a private key block")
    api_key_placeholder: str = option("<API_KEY>", "replaces an API token or an assigned secret")
    password_placeholder: str = option("<PASSWORD>", "replaces a password literal (its quotes are kept)")
    email_placeholder: str = option("<EMAIL>", "replaces an e-mail address")
    ip_address_placeholder: str = option("<IP_ADDRESS>", "replaces an IP address")

    def validate(self) -> None:
        for kind in KINDS:
            if not getattr(self, f"{kind}_placeholder"):
                raise ValueError(f"redact.{kind}_placeholder must not be empty")

    def active(self) -> list[str]:
        """The kinds switched on, in pass order."""
        if not self.enabled:
            return []
        return [k for k in KINDS if getattr(self, {"private_key": "private_keys", "api_key": "api_keys",
                                                   "password": "passwords", "email": "emails",
                                                   "ip_address": "ip_addresses"}[k])]


_PEM = re.compile(r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----.*?-----END ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----",
                  re.DOTALL)
_TOKEN = re.compile(r"(?<![A-Za-z0-9])(?:(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])|gh[pousr]_[A-Za-z0-9]{36,255}"
                    r"(?![A-Za-z0-9])|github_pat_[A-Za-z0-9_]{60,255}|xox[baprs]-[0-9A-Za-z-]{10,250}"
                    r"|AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-]))")
_TOKEN_SEED = re.compile(r"(?:AKIA|ASIA|AIza|xox[baprs]-|gh[pousr]_|github_pat_)")
# matched at each keyword found: the rest of the name (optionally quoted, as a JSON/JS key), an optional type
# (``password: str``, Go's ``var password string``), the operator, a quoted literal without quote, space or backslash;
# the name's start is found by scanning back from the keyword
_KEYWORDS = ("key", "secret", "token", "pass", "pwd")
_ASSIGN = re.compile(
    r"[\w$-]*+(?:[\"']|[ \t]*+:?[ \t]*+[A-Za-z_][\w.\[\]*]*+)?[ \t]*+(?::=|=(?!=)|:)[ \t]*+"
    r"[@rbuRBU]{0,2}(?P<q>[\"'`])(?P<value>[^\"'`\s\\]{1,200}+)(?P=q)")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$-")
_PASSWORD_NAME = re.compile(r"password|passwd|pwd|passphrase", re.IGNORECASE)
_NOT_A_PASSWORD_NAME = re.compile(r"state|dir|path|file|prompt|field|label|length|policy|hint|message|text",
                                  re.IGNORECASE)
_SECRET_NAME = re.compile(r"key|secret|token", re.IGNORECASE)
_NOT_A_SECRET_NAME = re.compile(r"(?:keyword|monkey|keyboard|keys?_?(?:name|id|type|file|path|len|size|field|column|"
                                r"prefix|func)|token_?(?:type|kind|name|id|s)\b|tokens)", re.IGNORECASE)
_DUMMY = {"password", "passwd", "pwd", "secret", "changeme", "change_me", "none", "null", "nil", "undefined", "true",
          "false", "example", "test", "dummy", "xxx", "xxxx", "xxxxxx", "...", "***", "******", "your_password",
          "yourpassword", "mypassword", "pass", "foo", "bar", "foobar", "admin", "guest", "anonymous", "user"}
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_EXAMPLE_DOMAIN = re.compile(r"^git@(?:github\.com|gitlab\.com|bitbucket\.org)$|@(?:.*\.)?(?:example\.(?:com|org|net)"
                             r"|[^@]*\.(?:example|test|invalid|localhost))$", re.IGNORECASE)
_IPV4_SEED = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d{1,3}")  # a literal first character: fast to scan for
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IP_EDGE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:")
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_NUMBERING = re.compile(r"version|\bver\b|section|clause|\bpar\b|\bpara|§|\[$|\bjls\b|\bjvms\b|c\+\+\d\d|\bper\b|\boid\b",
                        re.IGNORECASE)  # in the 40 before
_HEADING_BEFORE = re.compile(r"(?:^|>)[\s/#*;-]*$")  # nothing but a comment leader or a tag before it on its line
_HEADING_AFTER = re.compile(r"[ \t]+[A-Za-z(]|\]")


def _entropy(s: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _high_entropy(value: str) -> bool:
    return (len(value) >= 16 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
            and not re.fullmatch(r"[0-9a-fA-F]+", value) and re.fullmatch(r"[A-Za-z0-9+/=_\-.~]+", value) is not None
            and _entropy(value) >= 3.5)


def _password_value(value: str) -> bool:
    return (value.lower() not in _DUMMY and value[0] not in "$%{<(*" and "{" not in value and len(set(value)) > 1)


def _global_ip(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
        return address.is_global and not address.is_multicast
    except ValueError:
        return False


class Redactor:
    """Redacts one document's text at a time; the replacements accumulate per kind in :attr:`counts`."""

    def __init__(self, cfg: RedactConfig) -> None:
        self.kinds = set(cfg.active())
        self.counts: Counter[str] = Counter()
        self.placeholder = {k: str(getattr(cfg, f"{k}_placeholder")) for k in KINDS}

    def __call__(self, text: str) -> str:
        lower = text.lower()  # for the substring tests, and the keyword positions while the text is unchanged
        if "private_key" in self.kinds and "private key" in lower:
            text, lower = _PEM.sub(lambda m: self._count("private_key"), text), ""
        if "api_key" in self.kinds and _TOKEN_SEED.search(text) is not None:
            text, lower = _TOKEN.sub(lambda m: self._count("api_key"), text), ""
        if self.kinds & {"api_key", "password"}:
            text = self._assignments(text, lower or text.lower())
        if "email" in self.kinds and "@" in text:
            text = self._email(text)
        if "ip_address" in self.kinds:
            text = self._ip_address(text)
        return text

    def _count(self, kind: str) -> str:
        self.counts[kind] += 1
        return self.placeholder[kind]

    def _edit(self, text: str, spans: list[tuple[int, int, str]]) -> str:
        """``text`` with each (start, end, kind) span, in order and disjoint, replaced by its kind's placeholder."""
        if not spans:
            return text
        parts, last = [], 0
        for start, end, kind in spans:
            parts += [text[last:start], self._count(kind)]
            last = end
        parts.append(text[last:])
        return "".join(parts)

    def _assignments(self, text: str, lower: str) -> str:
        starts = sorted(i for word in _KEYWORDS if word in lower for i in _find_all(lower, word))
        spans: list[tuple[int, int, str]] = []
        end = 0
        for pos in starts:
            m = None if pos < end else _ASSIGN.match(text, pos)
            if m is None:
                continue
            end = m.end()
            value = m.group("value")
            if value.startswith("<") and value.endswith(">"):
                continue  # already a placeholder
            first = pos
            while first > 0 and text[first - 1] in _NAME_CHARS:
                first -= 1
            name = text[first:m.start("q")]
            if ("password" in self.kinds and _PASSWORD_NAME.search(name) and not _NOT_A_PASSWORD_NAME.search(name)
                    and _password_value(value)):
                spans.append((*m.span("value"), "password"))
            elif ("api_key" in self.kinds and _SECRET_NAME.search(name) and not _NOT_A_SECRET_NAME.search(name)
                  and _high_entropy(value)):
                spans.append((*m.span("value"), "api_key"))
        return self._edit(text, spans)

    def _email(self, text: str) -> str:
        spans: list[tuple[int, int, str]] = []
        for at in _find_all(text, "@"):
            m = _DOMAIN.match(text, at + 1)
            if m is None:
                continue
            start = at
            while start > 0 and at - start < 64 and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            while start < at and not text[start].isalnum():
                start += 1
            if start == at or (start > 0 and text[start - 1] in _LOCAL_CHARS) or (spans and start < spans[-1][1]):
                continue
            if _EXAMPLE_DOMAIN.search(text[start:m.end()]) is None:
                spans.append((start, m.end(), "email"))
        return self._edit(text, spans)

    def _ip_address(self, text: str) -> str:
        spans: list[tuple[int, int, str]] = []
        for seed in _IPV4_SEED.finditer(text):
            first = seed.start()
            while first > 0 and seed.start() - first < 3 and text[first - 1].isdigit():
                first -= 1
            m = _IPV4.match(text, first)
            if m is None or m.end() != seed.end() or (spans and first < spans[-1][1]):
                continue
            s, e = m.span()
            if (s > 0 and text[s - 1] in _IP_EDGE) or (e < len(text) and (text[e].isalnum() or text[e] == "_"
                                                                          or text[e:e + 2][1:].isdigit())):
                continue
            if _global_ip(m.group(0)) and not _numbering(text, s, e):
                spans.append((s, e, "ip_address"))
        if "::" in text or text.count(":") > 6:
            spans += self._ipv6(text)
            spans.sort()
        return self._edit(text, spans)

    def _ipv6(self, text: str) -> list[tuple[int, int, str]]:
        spans: list[tuple[int, int, str]] = []
        end = 0
        for m in _IPV6_SEED.finditer(text):
            if m.start() < end:
                continue
            s, e = m.start(), m.end()
            while s > 0 and text[s - 1] in _HEX_COLON:
                s -= 1
            while e < len(text) and text[e] in _HEX_COLON:
                e += 1
            end = e
            if (s > 0 and (text[s - 1] in _IP_EDGE)) or (e < len(text) and (text[e].isalnum() or text[e] == "_")):
                continue
            candidate = text[s:e]
            if any(c.isdigit() for c in candidate) and _global_ip(candidate):
                spans.append((s, e, "ip_address"))
        return spans


def _find_all(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def _numbering(text: str, s: int, e: int) -> bool:
    """Whether the IPv4-shaped text at [s, e) is a version or section number by its context."""
    line_start = text.rfind("\n", 0, s) + 1
    before = text[max(line_start, s - 40):s]
    heading = (line_start >= s - 40 and _HEADING_BEFORE.search(before) is not None
               and _HEADING_AFTER.match(text, e) is not None)
    return heading or _NUMBERING.search(before) is not None


def redact_documents(docs: list[Document], redactor: Redactor) -> list[Document]:
    """The documents with their text (and, for pairs, docstring, signature and body) redacted."""
    out = []
    for d in docs:
        if d.pair is None:
            out.append(dataclasses.replace(d, text=redactor(d.text)))
            continue
        pair = dataclasses.replace(d.pair, docstring=redactor(d.pair.docstring), signature=redactor(d.pair.signature),
                                   body=redactor(d.pair.body))
        out.append(dataclasses.replace(d, pair=pair, text=f"{pair.docstring}\n{pair.code}"))
    return out
