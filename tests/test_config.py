"""Config loading: TOML, ${VAR} substitution, validation and the errors a person reads."""

from __future__ import annotations

import re
from datetime import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from txsms.core.config import Config, SenderConfig, config_from_mapping, load_config
from txsms.core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "txsms.toml"
TWILIO = {"kind": "twilio", "account_sid": "AC1", "auth_token": "tok", "from": "+15555550100"}


def load(data: dict, **environ: str) -> Config:
    return config_from_mapping(data, file="test.toml", environ=environ)


def error(data: dict, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(data, **environ)
    return info.value


# --- The example file


def test_example_file_loads():
    config = load_config(EXAMPLE, environ={})
    assert config.path == EXAMPLE
    assert config.storage.url == "sqlite:///txsms-dev.db"
    assert config.provider.kind == "console"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.public_url == "http://127.0.0.1:8080"
    assert config.sender.name == "Demo Store"
    assert config.sender.timezone == "America/New_York"
    assert config.security.keys == ()  # the server generates a development key
    assert config.security.api_tokens == ("dev-token-change-me-0123456789",)


def test_example_file_reads_the_api_token_from_the_environment():
    config = load_config(EXAMPLE, environ={"TXSMS_API_TOKEN": "a-real-token-of-some-length"})
    assert config.security.api_tokens == ("a-real-token-of-some-length",)


def test_example_files_commented_blocks_are_valid(tmp_path):
    # Uncommenting the examples must give a working file: drop the active console provider,
    # then turn "# [table]" and "# key = value" lines into TOML.
    text = EXAMPLE.read_text().replace('[provider]\nkind = "console"\n', "", 1)
    text = re.sub(r"(?m)^# (\[|[a-z_]+ = )", r"\1", text)
    path = tmp_path / "uncommented.toml"
    path.write_text(text)
    env = {"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": "secret"}
    config = load_config(path, environ=env)
    assert config.provider.kind == "twilio"
    assert config.provider.account_sid == "AC123"
    assert config.provider.from_ == "+15555550100"
    assert config.policy.quiet_hours == (time(21, 0), time(8, 0))
    assert config.policy.max_per_day == 5
    assert set(config.templates["order.fulfilled"].locales) == {"fr"}


# --- Defaults and normalisation


def test_absent_sections_give_the_dataclass_defaults():
    assert load({}) == Config()


def test_a_partial_section_keeps_the_other_defaults():
    config = load({"sender": {"name": "Shop"}, "server": {"port": 9000}})
    assert config.sender == SenderConfig(name="Shop")
    assert config.server.port == 9000
    assert config.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("section", "given", "attribute", "stored"),
    [
        (
            "storage",
            {"url": "postgresql://u:p@db/txsms"},
            "url",
            "postgresql+psycopg://u:p@db/txsms",
        ),
        ("storage", {"url": "postgres://u@db/txsms"}, "url", "postgresql+psycopg://u@db/txsms"),
        ("storage", {"url": "postgresql+psycopg://u@db/x"}, "url", "postgresql+psycopg://u@db/x"),
        ("storage", {"url": "sqlite:////var/lib/txsms.db"}, "url", "sqlite:////var/lib/txsms.db"),
        ("storage", {"sqlite_synchronous": "normal"}, "sqlite_synchronous", "NORMAL"),
        (
            "server",
            {"public_url": "https://sms.example.com/"},
            "public_url",
            "https://sms.example.com",
        ),
        ("provider", {"base_url": "http://127.0.0.1:5000/"}, "base_url", "http://127.0.0.1:5000"),
        ("sender", {"default_region": "gb"}, "default_region", "GB"),
        ("provider", {"from": "+15555550100"}, "from_", "+15555550100"),
        ("policy", {"quiet_hours": "22:30 - 07:15"}, "quiet_hours", (time(22, 30), time(7, 15))),
        ("policy", {"quiet_hours": "01:00-05:00"}, "quiet_hours", (time(1, 0), time(5, 0))),
    ],
)
def test_values_are_normalised(section, given, attribute, stored):
    assert getattr(getattr(load({section: given}), section), attribute) == stored


def test_security_lists_become_tuples():
    key = Fernet.generate_key().decode()
    config = load({"security": {"keys": [key], "index_key": "i" * 16, "api_tokens": ["x" * 16]}})
    assert config.security.keys == (key,)
    assert config.security.api_tokens == ("x" * 16,)


def test_templates_are_keyed_by_event_kind_and_locales_are_normalised():
    data = {
        "templates": {"order.created": {"body": "Hi", "urgent": True, "locales": {"pt_BR": "Oi"}}}
    }
    template = load(data).templates["order.created"]
    assert (template.body, template.urgent, template.category) == ("Hi", True, None)
    assert template.locales == {"pt-BR": "Oi"}


def test_platform_sections_are_plain_dicts_with_secrets_as_lists():
    config = load(
        {
            "shopify": {"shops": [{"domain": "Demo.MyShopify.com", "secret": "s1"}]},
            "woocommerce": {"stores": [{"url": "https://shop.example/", "secret": ["a", "b"]}]},
            "crm": [{"name": "hub", "kind": "hubspot", "token": "pat-1"}],
        }
    )
    shop = config.shopify["shops"][0]
    assert shop == {"domain": "demo.myshopify.com", "secret": ["s1"], "send_test_orders": False}
    assert config.woocommerce["stores"][0] == {"url": "https://shop.example", "secret": ["a", "b"]}
    assert config.crm == ({"name": "hub", "kind": "hubspot", "token": "pat-1"},)


# --- ${VAR} substitution


def test_variables_are_substituted_everywhere_including_lists():
    config = load(
        {"provider": {**TWILIO, "auth_token": "${TOKEN}"}, "security": {"api_tokens": ["${API}"]}},
        TOKEN="from-env",
        API="api-token-from-the-env",
    )
    assert config.provider.auth_token == "from-env"
    assert config.security.api_tokens == ("api-token-from-the-env",)


@pytest.mark.parametrize(
    ("environ", "port"),
    [({}, 9000), ({"PORT": ""}, 9000), ({"PORT": "8443"}, 8443)],
)
def test_default_applies_when_the_variable_is_unset_or_empty(environ, port):
    assert load({"server": {"port": "${PORT:-9000}"}}, **environ).server.port == port


def test_variable_in_the_middle_of_a_string():
    config = load({"storage": {"url": "postgresql://txsms:${PW}@db/txsms"}}, PW="hunter2")
    assert config.storage.url == "postgresql+psycopg://txsms:hunter2@db/txsms"


def test_missing_variable_names_the_variable_and_the_key():
    err = error({"provider": {**TWILIO, "auth_token": "${TWILIO_AUTH_TOKEN}"}})
    assert err.problem == "environment variable TWILIO_AUTH_TOKEN is not set"
    assert (err.key, err.file) == ("provider.auth_token", "test.toml")


def test_missing_variable_inside_a_list_names_the_index():
    err = error({"security": {"api_tokens": ["x" * 16, "${NOPE}"]}})
    assert err.key == "security.api_tokens.1"


def test_substitution_uses_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("TXSMS_TEST_NAME", "From Environ")
    assert config_from_mapping({"sender": {"name": "${TXSMS_TEST_NAME}"}}).sender.name == (
        "From Environ"
    )


# --- Errors: the key and the problem


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (
            {"provider": {"rate_per_secnd": 5}},
            "provider.rate_per_secnd",
            "unknown key (did you mean 'rate_per_second'?)",
        ),
        ({"provider": {"zzz": 1}}, "provider.zzz", "unknown key"),
        ({"sevrer": {}}, "sevrer", "unknown section (did you mean 'server'?)"),
        ({"provider": {"kind": "twillio"}}, "provider.kind", "did you mean 'twilio'?"),
        ({"provider": {"kind": "sinch"}}, "provider.kind", "unknown provider kind 'sinch'"),
        ({"provider": {"kind": "vonage"}}, "provider.api_key", 'required when kind = "vonage"'),
        (
            {"templates": {"order.creatd": {"body": "x"}}},
            "templates.order.creatd",
            "unknown event kind (did you mean 'order.created'?)",
        ),
        (
            {"templates": {"order.created": {"bdy": "x"}}},
            "templates.order.created.bdy",
            "did you mean 'body'?",
        ),
        (
            {"templates": {"order.created": {"category": "shiping"}}},
            "templates.order.created.category",
            "did you mean 'shipping'?",
        ),
        (
            {"security": {"keys": ["not-a-key"]}},
            "security.keys.0",
            "not a valid Fernet key (make one with 'txsms keygen')",
        ),
        ({"security": {"api_tokens": ["short"]}}, "security.api_tokens.0", "at least 16"),
        ({"security": {"index_key": "short"}}, "security.index_key", "at least 16"),
        (
            {"security": {"keys": ["ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg="]}},
            "security.index_key",
            "required with security.keys",
        ),
        ({"security": {"retention_days": 0}}, "security.retention_days", "greater than or equal"),
        ({"server": {"port": 70000}}, "server.port", "65535"),
        ({"server": {"port": "eighty"}}, "server.port", "integer"),
        ({"server": {"max_body_bytes": 100}}, "server.max_body_bytes", "1024"),
        ({"server": {"threads": 0}}, "server.threads", "256"),
        ({"server": {"public_url": "sms.example.com"}}, "server.public_url", "http(s) URL"),
        ({"provider": {"base_url": "ftp://x.example"}}, "provider.base_url", "http(s) URL"),
        ({"storage": {"url": "mysql://db/x"}}, "storage.url", "sqlite:///PATH"),
        ({"storage": {"sqlite_synchronous": "fast"}}, "storage.sqlite_synchronous", "NORMAL"),
        ({"sender": {"default_region": "XX"}}, "sender.default_region", "unknown region"),
        ({"sender": {"timezone": "Mars/Olympus"}}, "sender.timezone", "unknown time zone"),
        ({"sender": {"stop_reply": "Bye {customer}"}}, "sender.stop_reply", "only {name}"),
        ({"provider": {"rate_per_second": 0}}, "provider.rate_per_second", "greater than 0"),
        ({"provider": {"timeout_seconds": -1}}, "provider.timeout_seconds", "greater than 0"),
        ({"policy": {"max_per_day": 0}}, "policy.max_per_day", "greater than or equal to 1"),
        ({"worker": {"concurrency": 65}}, "worker.concurrency", "64"),
        ({"worker": {"max_attempts": 0}}, "worker.max_attempts", "greater than or equal to 1"),
        ({"worker": {"lease_seconds": 0}}, "worker.lease_seconds", "greater than 0"),
        (
            {"shopify": {"shops": [{"domain": "https://x.myshopify.com", "secret": "s"}]}},
            "shopify.shops.0.domain",
            "host name",
        ),
        (
            {"shopify": {"shops": [{"domain": "x.myshopify.com"}]}},
            "shopify.shops.0.secret",
            "Missing",
        ),
        (
            {"shopify": {"shops": [{"domain": "x.myshopify.com", "secret": []}]}},
            "shopify.shops.0.secret",
            "expected a secret",
        ),
        (
            {"shopify": {"shops": [{"domain": "a.myshopify.com", "secret": "s"}] * 2}},
            "shopify.shops.1.domain",
            "duplicate domain",
        ),
        ({"woocommerce": {"stores": [{"secret": "s"}]}}, "woocommerce.stores.0.url", "Missing"),
        ({"crm": [{"name": "Big CRM", "kind": "http"}]}, "crm.0.name", "a-z"),
        ({"crm": [{"name": "c", "kind": "salesforce"}]}, "crm.0.kind", "unknown CRM kind"),
        (
            {
                "crm": [
                    {"name": "c", "kind": "http", "url": "https://crm.example"},
                    {"name": "c", "kind": "hubspot", "token": "pat-1"},
                ]
            },
            "crm.1.name",
            "duplicate name",
        ),
    ],
)
def test_bad_values_name_the_dotted_key(data, key, problem):
    err = error(data)
    assert err.key == key
    assert problem in err.problem
    assert err.file == "test.toml"


@pytest.mark.parametrize("text", ["21:00", "9pm-8am", "25:00-08:00", "21:00-08:60", ""])
def test_bad_quiet_hours(text):
    err = error({"policy": {"quiet_hours": text}})
    assert err.key == "policy.quiet_hours"
    assert err.problem == 'expected "HH:MM-HH:MM", e.g. "21:00-08:00"'


def test_quiet_hours_must_not_start_and_end_together():
    assert error({"policy": {"quiet_hours": "22:00-22:00"}}).key == "policy.quiet_hours"


@pytest.mark.parametrize(
    ("missing", "key"),
    [("account_sid", "provider.account_sid"), ("auth_token", "provider.auth_token")],
)
def test_twilio_needs_its_credentials(missing, key):
    provider = {k: v for k, v in TWILIO.items() if k != missing}
    err = error({"provider": provider})
    assert (err.key, err.problem) == (key, 'required when kind = "twilio"')


def test_twilio_needs_a_sender():
    provider = {k: v for k, v in TWILIO.items() if k != "from"}
    err = error({"provider": provider})
    assert err.key == "provider.from"
    assert "messaging_service_sid" in err.problem
    config = load({"provider": {**provider, "messaging_service_sid": "MG1"}})
    assert (config.provider.from_, config.provider.messaging_service_sid) == (None, "MG1")


def test_console_needs_no_credentials():
    assert load({"provider": {"kind": "console"}}).provider.account_sid is None


def test_the_first_error_by_key_is_raised_and_all_are_attached():
    err = error({"worker": {"concurrency": 0}, "server": {"port": 0}, "sendr": {}})
    assert err.key == "sendr"
    assert [k for k, _ in err.all_errors] == ["sendr", "server.port", "worker.concurrency"]


def test_list_indexes_sort_as_numbers():
    shops = [{"domain": f"s{i}.myshopify.com", "secret": "s"} for i in range(11)]
    shops[10]["domain"] = shops[2]["domain"] = "bad domain"
    err = error({"shopify": {"shops": shops}})
    assert [k for k, _ in err.all_errors] == ["shopify.shops.2.domain", "shopify.shops.10.domain"]


def test_str_of_a_config_error_is_one_line_with_file_and_key(tmp_path):
    path = tmp_path / "prod.toml"
    path.write_text("[provider]\nrate_per_secnd = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"{path}: provider.rate_per_secnd: unknown key (did you mean 'rate_per_second'?)"
    )


# --- Finding and reading the file


def test_txsms_config_is_used_when_no_path_is_given(tmp_path):
    path = tmp_path / "from-env.toml"
    path.write_text('[sender]\nname = "Env Shop"\n')
    config = load_config(environ={"TXSMS_CONFIG": str(path)})
    assert config.sender.name == "Env Shop"
    assert config.path == path


def test_an_explicit_path_wins_over_txsms_config(tmp_path):
    path = tmp_path / "explicit.toml"
    path.write_text('[sender]\nname = "Explicit"\n')
    config = load_config(path, environ={"TXSMS_CONFIG": str(tmp_path / "absent.toml")})
    assert config.sender.name == "Explicit"


def test_no_path_and_no_txsms_config():
    with pytest.raises(ConfigError) as info:
        load_config(environ={})
    assert str(info.value) == "no configuration: pass --config PATH or set TXSMS_CONFIG"


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[server]\nport = 8080\nhost = "127.0.0.1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    err = info.value
    assert (err.file, err.key) == (str(path), None)
    assert "line 3" in err.problem
    assert str(err).startswith(f"{path}: ")
