"""Schemathesis against the service's own OpenAPI schema, on a real uvicorn process.

Fixed seed, hundreds of generated requests per operation (over 2,000 in all, counted
and asserted): no 5xx, and every response conforms to the schema (status code,
content type, headers, JSON body).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from app.main import create_app
from app.settings import Settings
from tests.conftest import vae_serve

pytestmark = pytest.mark.slow
SENT: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[str]:
    with vae_serve({"VAE_MODELS_DIR": str(models_dir), "VAE_MAX_SAMPLES": "64", "VAE_MAX_K": "128",
                    "VAE_MAX_BATCH": "8"}) as (base, _):
        yield base


# The schema does not depend on the models, so it is read from the app object at import time
# (what the running server serves at /openapi.json is the same document; a test checks that).
# Positive (schema-valid) requests may still be refused for what no JSON schema can say: bytes that
# are no decodable image (415), an image too large or a batch/n above a runtime limit (413), a
# non-28x28 image with fit=false (422). Everything else must be accepted. Schema-violating requests
# must be refused, and a body holding more values than the batch limit allows is refused as too large
# (413) before its values are read, whatever they are.
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261124,
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 404, 413, 415, 422]},
               "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422,
                                                                  428, 429, "5xx"]}},
})
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi(), config=CONFIG)


@schema.parametrize()
@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_fails(case, server: str) -> None:
    SENT[f"{case.method} {case.path}"] += 1
    case.call_and_validate(base_url=server, timeout=30)


def test_served_schema_is_the_fuzzed_one(server: str) -> None:
    assert requests.get(f"{server}/openapi.json", timeout=5).json() == schema.raw_schema


def test_enough_requests_were_generated() -> None:
    total = sum(SENT.values())
    print(f"\nschemathesis sent {total} requests: {dict(SENT)}")
    assert total >= 2000, dict(SENT)
