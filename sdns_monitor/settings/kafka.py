"""Kafka client security settings, passed through to kafka-python."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)


class KafkaSecurity(BaseModel):
    """Client security, passed through to the Kafka client (kafka-python's option names)."""

    model_config = ConfigDict(extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="`PLAINTEXT`, `SSL` (TLS), `SASL_PLAINTEXT` (SASL authentication) or "
        "`SASL_SSL` (SASL over TLS).",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None,
        description="`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with the `SASL_*` "
        "protocols, refused without them. `OAUTHBEARER` is not supported (the Kafka client "
        "needs a token provider object, which a setting cannot give).",
    )
    sasl_plain_username: str | None = Field(
        default=None, description="SASL user name (PLAIN and SCRAM)."
    )
    sasl_plain_password: SecretStr | None = Field(
        default=None,
        description="SASL password: environment or config file only, never a command-line option.",
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA certificate(s) that signed the brokers' certificates (PEM)."
    )
    ssl_certfile: Path | None = Field(
        default=None, description="Client certificate, for mutual TLS (PEM)."
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="Client private key, for mutual TLS (PEM)."
    )
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of `ssl_keyfile`: environment or config file only."
    )

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = self.security_protocol.startswith("SASL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs a sasl_mechanism")
        if sasl and (not self.sasl_plain_username or self.sasl_plain_password is None):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_plain_username and "
                "sasl_plain_password"
            )
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                "sasl_mechanism is set but security_protocol is not SASL_PLAINTEXT or SASL_SSL"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        return self

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients (secrets revealed only here)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        for key, value in self.model_dump(exclude_none=True).items():
            if key == "security_protocol":
                continue
            out[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return out
