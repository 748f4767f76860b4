"""Typed settings for the pipeline service, read once from the environment."""

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob the pipeline reads from its environment (names are upper-cased fields)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = Field(
        description="PostgreSQL URL, postgresql:// or postgresql+psycopg2://",
    )
    mock_server_url: str = Field(
        default="http://localhost:5000", description="Base URL of the paginated source API"
    )
    ingest_page_size: int = Field(
        default=1000, ge=1, le=1000, description="Records asked for per source page"
    )
    ingest_workers: int = Field(
        default=2,
        ge=0,
        le=32,
        description="Worker processes that fetch, validate and render pages while the ingest "
        "writes (0: threads in the serving process instead)",
    )
    source_connect_timeout: float = Field(
        default=3.0, gt=0, description="Seconds to wait for a TCP connection to the source"
    )
    source_read_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for the source to answer one page"
    )
    source_max_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries per source page before the ingest gives up"
    )
    source_give_up_seconds: float = Field(
        default=20.0, gt=0, description="Total seconds spent retrying one page before giving up"
    )
    pipeline_api_key: str | None = Field(
        default=None, description="When set, POST endpoints need 'Authorization: Bearer <key>'"
    )
    pipeline_workers: int = Field(
        default=1, ge=1, le=32, description="Server processes sharing the port (one per core)"
    )
    log_level: str = Field(default="INFO", description="Python logging level")

    @field_validator("database_url")
    @classmethod
    def _use_psycopg2_driver(cls, url: str) -> str:
        """Accept both postgresql:// and postgresql+psycopg2:// (and the postgres:// alias)."""
        for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg2://" + url[len(prefix) :]
        raise ValueError("DATABASE_URL must start with postgresql:// or postgresql+psycopg2://")

    @field_validator("mock_server_url")
    @classmethod
    def _strip_trailing_slash(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("MOCK_SERVER_URL must start with http:// or https://")
        return url.rstrip("/")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; fails with one readable line when the environment is wrong."""
    return Settings()
