"""Validates JSON documents against a schema inside an OpenAPI 3.1 document
(JSON Schema 2020-12, with the document's own `$ref`s), using the
`jsonschema` package (PyPI).

Usage: check_schema.py OPENAPI_YAML POINTER < document.json
POINTER is a JSON pointer into the OpenAPI document, e.g.
`/paths/~1v1~1members/get/responses/200/content/application~1json/schema`.
Exits 0 when the document matches, 1 with the errors otherwise.
"""

import json
import sys

import jsonschema
import referencing
import yaml


def main():
    spec_path, pointer = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    uri = "urn:weft:api"
    resource = referencing.Resource.from_contents(
        spec, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource(uri, resource)
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{uri}#{pointer}"}, registry=registry
    )
    document = json.load(sys.stdin)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    for error in errors:
        print(f"{list(error.path)}: {error.message}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
