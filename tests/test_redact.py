"""Redaction (data_pipeline/redact.py): planted secrets in the five HumanEval-X languages, what must survive, the
build's counts, and the false-positive rate on the embedded default corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.redact_speed import changes, default_texts
from data_pipeline.redact import KINDS, RedactConfig, Redactor
from data_pipeline.store import TokenStore
from data_pipeline.tokenizer import CodeTokenizer
from tests.test_build import build

PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
       "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----")
SECRETS = {"EMAIL": "jane.doe@corp-mail.io", "IP": "93.184.216.77",
           "PEM": PEM, "AWS": "AKIAIOSFODNN7EXAMPLE", "GH": "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF3hJ5",
           "PW": "Tr0ub4dor&3"}
HOLDERS = {"EMAIL": "<EMAIL>", "IP": "<IP_ADDRESS>", "PEM": "<PRIVATE_KEY>", "AWS": "<API_KEY>", "GH": "<API_KEY>",
           "PW": "<PASSWORD>"}
EXPECTED = {"email": 1, "ip_address": 1, "private_key": 1, "api_key": 2, "password": 1}
# what must survive in every program: a version string, loopback and private addresses, a password read at run time,
# a digest assigned to a *key* name, an RFC 2606 example address, a comparison with a literal
PROGRAMS = {
    "Python": '''# Maintainer: {EMAIL}, see also someone@example.com
__version__ = "1.2.3.4"
LOCAL, LAN = "127.0.0.1", "192.168.1.20"
SERVER = "{IP}"
KEY = """{PEM}"""
AWS_ACCESS_KEY_ID = "{AWS}"
TOKEN = '{GH}'
expected_key = "d41d8cd98f00b204e9800998ecf8427e"


def login(user):
    password = "{PW}"
    typed = input()
    if typed == "hunter2":
        return get_password(user)
    return password == typed
''',
    "C++": '''// Maintainer: {EMAIL}, see also someone@example.com
#include <string>
const char* version = "1.2.3.4";
const std::string local = "127.0.0.1";
const std::string server = "{IP}";
const char* key = R"({PEM})";
std::string aws = "{AWS}"; std::string gh = "{GH}";
std::string expected_key = "d41d8cd98f00b204e9800998ecf8427e";
bool login(const std::string& typed) {{
    const char* password = "{PW}";
    std::string other = get_password();
    return typed == password;
}}
''',
    "Java": '''// Maintainer: {EMAIL}, see also someone@example.com
public class Login {{
    static final String VERSION = "1.2.3.4";
    static final String LOCAL = "127.0.0.1", SERVER = "{IP}";
    static final String KEY = """
{PEM}
""";
    static final String AWS = "{AWS}", GH = "{GH}";
    static final String expectedKey = "d41d8cd98f00b204e9800998ecf8427e";
    boolean login(String typed) {{
        String password = "{PW}";
        String other = readPassword();
        return typed.equals(password);
    }}
}}
''',
    "JavaScript": '''// Maintainer: {EMAIL}, see also someone@example.com
const version = "1.2.3.4";
const local = "127.0.0.1", server = "{IP}";
const key = `{PEM}`;
const creds = {{ aws: "{AWS}", gh: "{GH}", password: "{PW}" }};
const expectedKey = "d41d8cd98f00b204e9800998ecf8427e";
function login(typed) {{
  const other = getPassword();
  return typed === creds.password;
}}
''',
    "Go": '''// Maintainer: {EMAIL}, see also someone@example.com
package main

const version = "1.2.3.4"
const local, server = "127.0.0.1", "{IP}"
const key = `{PEM}`
var aws, gh = "{AWS}", "{GH}"
var expectedKey = "d41d8cd98f00b204e9800998ecf8427e"

func login(typed string) bool {{
	password := "{PW}"
	other := getPassword()
	return typed == password && other != ""
}}
''',
}
SUFFIX = {"Python": "py", "C++": "cpp", "Java": "java", "JavaScript": "js", "Go": "go"}


@pytest.mark.parametrize("language", sorted(PROGRAMS))
def test_planted_secrets_are_replaced_and_nothing_else_changes(language):
    redactor = Redactor(RedactConfig())
    out = redactor(PROGRAMS[language].format(**SECRETS))
    assert out == PROGRAMS[language].format(**HOLDERS)  # byte-identical but for the placeholders
    assert dict(redactor.counts) == EXPECTED
    assert Redactor(RedactConfig(enabled=False))(PROGRAMS[language].format(**SECRETS)) == \
        PROGRAMS[language].format(**SECRETS)


def test_each_kind_switches_off_alone_and_negatives_survive():
    text = PROGRAMS["Python"].format(**SECRETS)
    for kind, switch in (("email", "emails"), ("ip_address", "ip_addresses"), ("private_key", "private_keys"),
                         ("password", "passwords")):
        redactor = Redactor(RedactConfig(**{switch: False}))
        redactor(text)
        assert kind not in redactor.counts and sum(redactor.counts.values()) == sum(EXPECTED.values()) - EXPECTED[kind]
    keep = ['version = "1.2.3.4"', "// 27.4.4.1 basic_ios constructors", "see [18.2.1.1]", "::1", "fe80::1ff:fe23:4567",
            "std::vector<int> v; a::b::c", "password = ''", "password = '${DB_PASSWORD}'", "token_type = 'Bearer'",
            "key = 'abcdefabcdef0123456789abcdef0123'", "git@github.com:org/repo.git", "icon@2x", "10.0.0.1"]
    redactor = Redactor(RedactConfig())
    assert [redactor(k) for k in keep] == keep
    assert redactor("addr = '2001:4860:4860::8888'") == "addr = '<IP_ADDRESS>'"
    assert redactor('{"client_secret": "q8Zr2LmX9vT4kW7pN3sB"}') == '{"client_secret": "<API_KEY>"}'
    with pytest.raises(ValueError, match="redact.email_placeholder"):
        RedactConfig(email_placeholder="").validate()


WHOLE = ("filters.parse=false", "pack.mode=best_fit")


def _decoded(out: Path, tok: CodeTokenizer) -> str:
    s = TokenStore(out)  # best_fit windows of 2048 tokens: each document whole in one window
    return "\n".join(tok.decode(int(i) for i in s[w].tokens[:s[w].num_tokens]) for w in range(len(s)))


def test_build_stores_no_secret_and_counts_each_kind(tokenizer_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for lang, program in PROGRAMS.items():
        (src / f"login.{SUFFIX[lang]}").write_text(program.format(**SECRETS))
    tok = CodeTokenizer(tokenizer_model)
    m = build([str(src)], tokenizer_model, tmp_path / "on", *WHOLE, **{"pack.seq_len": 2048})
    text = _decoded(tmp_path / "on", tok)
    assert m.total_documents == 5 and m.redactions == {k: 5 * v for k, v in EXPECTED.items()}
    assert not [s for s in SECRETS.values() if s in text] and text.count("<PASSWORD>") == 5
    off = build([str(src)], tokenizer_model, tmp_path / "off", *WHOLE, "redact.enabled=false",
                **{"pack.seq_len": 2048})
    assert off.redactions == {} and SECRETS["PW"] in _decoded(tmp_path / "off", tok)
    assert m.identity != off.identity  # a store is rebuilt when the redaction settings change


def test_false_positive_rate_on_the_default_corpus():
    """Installed system source holds no real secret, so every password, API key or private key found there is a
    false positive: under 0.5% of documents (one in 200; measured 0 of 3,120 with 8 MiB per language). IP-shaped
    strings there are example addresses, OIDs and section numbers the context rules do not all catch: under 2%
    (measured 0.93%, benchmarks/redact_speed.py). E-mail addresses are real ones (authors in copyright headers),
    redacted by design, and not bounded."""
    texts = default_texts(1.0)
    assert len(texts) > 200
    docs, matches, sample = changes(texts)
    secret_docs = sum(docs[k] for k in ("private_key", "api_key", "password"))
    assert secret_docs / len(texts) < 0.005, [s for s in sample if s[0] != "email"]
    assert docs["ip_address"] / len(texts) < 0.02, [s for s in sample if s[0] == "ip_address"]
    assert set(docs) <= set(KINDS)
