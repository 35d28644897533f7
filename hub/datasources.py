"""Data source configurations: what an agent's data means (data sources grouping typed data points).

The document is validated here, once, with pydantic, before it is stored: every string and list is
bounded (a configuration is read by every agent poll, so an unbounded one is a memory and bandwidth
attack), data point ids are unique across the whole configuration (the platform keys time series by them,
so a duplicate would silently merge two series), free-form `customData` is bounded in size and depth,
and no text holds a NUL, `customData`'s keys and strings included: the document is stored as JSON, so a
NUL would pass escaped and be served to every agent, while the hub refuses one in any other text (as
PostgreSQL's text cannot hold it; see `texts`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from .errors import InvalidRequestError
from .texts import storable_text

MAX_DATA_SOURCES = 100
MAX_DATA_POINTS = 2000  # across the whole configuration
MAX_CUSTOM_DATA_BYTES = 8 << 10
MAX_CUSTOM_DATA_DEPTH = 8

Name = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(storable_text)]
Description = Annotated[str, Field(max_length=2048), AfterValidator(storable_text)]
Identifier = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
Unit = Annotated[str, Field(max_length=32), AfterValidator(storable_text)]


class DataPointType(enum.StrEnum):
    INT = "INT"
    LONG = "LONG"
    DOUBLE = "DOUBLE"
    BOOLEAN = "BOOLEAN"
    STRING = "STRING"
    BIG_STRING = "BIG_STRING"
    TIMESTAMP = "TIMESTAMP"


def _bounded_custom_data(value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
    """Stops a `customData` blob from growing the stored document without bound, or nesting deep enough
    to exhaust a client's recursive JSON parser, or carrying a NUL past the check every other text gets."""
    if value is None:
        return value
    if len(json.dumps(value, separators=(",", ":"))) > MAX_CUSTOM_DATA_BYTES:
        raise ValueError(f"customData exceeds {MAX_CUSTOM_DATA_BYTES} bytes")
    if _depth(value) > MAX_CUSTOM_DATA_DEPTH:
        raise ValueError(f"customData nests deeper than {MAX_CUSTOM_DATA_DEPTH} levels")
    for text in _texts(value):
        storable_text(text)
    return value


def _depth(value: JsonValue) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0


def _texts(value: JsonValue) -> Iterator[str]:
    """Every key and string in `value`, however deep."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


CustomData = Annotated[dict[str, JsonValue] | None, AfterValidator(_bounded_custom_data)]


class _Closed(BaseModel):
    """Wire names are the platform's camelCase; an unknown field is refused, not silently dropped."""

    # lax mode still refuses numbers for strings; enums arrive as their names from JSON
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataPoint(_Closed):
    id: Identifier
    name: Name
    description: Description = ""
    type: DataPointType
    unit: Unit
    customData: CustomData = None


class DataSource(_Closed):
    name: Name
    description: Description = ""
    dataPoints: list[DataPoint] = Field(min_length=1, max_length=MAX_DATA_POINTS)
    customData: CustomData = None


class DataSourceDocument(_Closed):
    """The configuration as a client sends it (`eTag`, echoed from a GET, is accepted and ignored: the
    `If-Match` header is what guards the update)."""

    configurationId: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(storable_text)]
    description: Description = ""
    dataSources: list[DataSource] = Field(max_length=MAX_DATA_SOURCES)
    eTag: str | None = Field(default=None, exclude=True, max_length=32)

    @model_validator(mode="after")
    def _unique_ids(self) -> DataSourceDocument:
        """Data point ids must be unique across the configuration, and the total bounded."""
        seen: set[str] = set()
        for source in self.dataSources:
            for point in source.dataPoints:
                if point.id in seen:
                    raise ValueError(f"data point id {point.id!r} is used twice")
                seen.add(point.id)
        if len(seen) > MAX_DATA_POINTS:
            raise ValueError(f"more than {MAX_DATA_POINTS} data points")
        return self


#: what a new agent has until someone configures it
EMPTY_DOCUMENT: dict[str, Any] = {"configurationId": "", "description": "", "dataSources": []}


def stored_form(document: DataSourceDocument) -> dict[str, Any]:
    """The document as the hub keeps and serves it (without `eTag`, which the hub owns)."""
    stored: dict[str, Any] = document.model_dump(mode="json", exclude_none=True)
    return stored


def parse_document(raw: object) -> dict[str, Any]:
    """The stored form of a client's configuration, or `InvalidRequestError` naming the first problems."""
    try:
        document = DataSourceDocument.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error.get("loc", ()))
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        raise InvalidRequestError("invalid data source configuration: " + "; ".join(problems)) from exc
    return stored_form(document)
