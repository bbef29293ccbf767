# SPDX-License-Identifier: Apache-2.0
"""The node's services as tools for an LLM agent: JSON schemas generated from the .srv definitions, and a caller.

``tools.json`` (beside this file) holds one function-calling tool per service, in the common format
``{"type": "function", "function": {"name", "description", "parameters": <JSON schema>}}``, generated from
``srv/*.srv``: each tool's description is the comment at the top of its .srv file, each parameter's the comment
above its field, and its type follows the field's (string, boolean, integer with bounds, number, arrays of them;
``SOURCE_*`` constants become an enum; a ``builtin_interfaces/Time`` is a number of seconds since the Unix epoch).
Image fields are left out: an agent names a camera, it does not send
pixels (and so ``SOURCE_IMAGE`` is not offered). test/test_planners.py checks the file against the .srv files and
against the generated message classes, so it cannot drift from them::

    python -m ego_ros.ros.tools             # print the tools
    python -m ego_ros.ros.tools --write     # regenerate tools.json from srv/ after changing a .srv file

:func:`call_tool` runs an agent's tool call on the node through an :class:`~ego_ros.ros.commander.EgoCommander`
and returns the response as a JSON-ready dict.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

TOOLS_FILE = Path(__file__).with_name("tools.json")
# tool name (the service's name under the node) -> its .srv file's stem
SERVICES = {"list_concepts": "ListConcepts", "register_concept": "RegisterConcept", "ask": "Ask",
            "recognize": "Recognize", "forget_concept": "ForgetConcept", "last_seen": "LastSeen"}
# Fields without which a request makes no sense (a .srv cannot say so: every field has a default).
REQUIRED = {"register_concept": ["name"], "ask": ["question"], "forget_concept": ["name"], "last_seen": ["name"]}
TIME = "builtin_interfaces/Time"
# Pixels are for programs, not for a language model: these fields are left out of the tools.
IMAGE_TYPES = ("sensor_msgs/Image", "Image", "sensor_msgs/RegionOfInterest")
# Set by the caller, not by the agent: the request id by which the node tells a request sent again (call_tool sets it).
CLIENT_FIELDS = ("request_id",)
_INTEGER_BOUNDS = {"uint8": (0, 255), "uint16": (0, 65535), "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
                   "int8": (-128, 127), "int16": (-32768, 32767), "int32": (-2**31, 2**31 - 1),
                   "int64": (-2**63, 2**63 - 1)}
_FIELD = re.compile(
    r"^(?P<type>[A-Za-z0-9_/]+)(?P<array>\[\])?\s+(?P<name>[A-Za-z][A-Za-z0-9_]*)\s*(?P<constant>=.*)?$")


def srv_folder() -> Path:
    """srv/ of this source checkout, else share/ego_ros/srv of the install that holds this module."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "srv", *(p / "share" / "ego_ros" / "srv" for p in here.parents)):
        if (candidate / "Ask.srv").is_file():
            return candidate
    raise FileNotFoundError("no srv/ folder with Ask.srv next to this checkout or install")


def parse_request(text: str) -> tuple[str, list[dict], dict[str, int]]:
    """The request part of a .srv file: (its leading comment, fields in order with their comments, constants)."""
    request = text.split("\n---", 1)[0]
    comment, fields, constants = [], [], {}
    description = None
    for raw in request.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comment.append(line.lstrip("#").strip())
            continue
        if not line:
            if comment and description is None and not fields and not constants:
                description = " ".join(comment)
            comment = []
            continue
        match = _FIELD.match(line)
        if match is None:
            raise ValueError(f"cannot read the .srv line {line!r}")
        if match["constant"]:
            constants[match["name"]] = int(match["constant"].lstrip("= ").strip())
        else:
            fields.append({"name": match["name"], "type": match["type"], "array": bool(match["array"]),
                           "comment": " ".join(comment)})
        comment = []
    if description is None:  # a request with no field: its comment is the description
        description = " ".join(comment)
    return description, fields, constants


def _schema(field: dict, constants: dict[str, int]) -> dict:
    ros_type = field["type"]
    if ros_type == "string":
        item = {"type": "string"}
    elif ros_type in ("bool", "boolean"):
        item = {"type": "boolean"}
    elif ros_type in _INTEGER_BOUNDS:
        low, high = _INTEGER_BOUNDS[ros_type]
        item = {"type": "integer", "minimum": low, "maximum": high}
    elif ros_type in ("float32", "float64"):
        item = {"type": "number"}
    elif ros_type == TIME:  # an agent reads and writes clock times as numbers, not as {sec, nanosec}
        item = {"type": "number", "minimum": 0}
    else:
        raise ValueError(f"no JSON type for the field {field['name']} of type {ros_type}")
    prefix = field["name"].upper() + "_"
    values = {name: value for name, value in constants.items() if name.startswith(prefix) and "IMAGE" not in name}
    if values:
        item["enum"] = sorted(values.values())
    schema = {"type": "array", "items": item} if field["array"] else item
    description = field["comment"]
    if values:
        ordered = sorted(values.items(), key=lambda item: item[1])
        description += " Values: " + ", ".join(f"{value} = {name}" for name, value in ordered)
    if ros_type == TIME:
        description += " In seconds since the Unix epoch (UTC)."
    schema["description"] = description
    return schema


def generate(folder: Path | None = None) -> list[dict]:
    """The tools, from the .srv files in ``folder`` (default: :func:`srv_folder`)."""
    folder = folder or srv_folder()
    tools = []
    for tool, stem in SERVICES.items():
        description, fields, constants = parse_request((folder / f"{stem}.srv").read_text())
        properties = {f["name"]: _schema(f, constants) for f in fields
                      if f["type"] not in IMAGE_TYPES and f["name"] not in CLIENT_FIELDS}
        left_out = [f["name"] for f in fields if f["type"] in IMAGE_TYPES]
        if left_out:  # the field comments may still mention them
            description += (f" Image and region fields are not offered here ({', '.join(left_out)}): "
                            "name a camera instead.")
        parameters = {"type": "object", "properties": properties, "additionalProperties": False}
        if REQUIRED.get(tool):
            parameters["required"] = REQUIRED[tool]
        tools.append({"type": "function", "function": {
            "name": tool, "description": f"{description} (ROS 2 service ~/{tool}, ego_ros/srv/{stem})",
            "parameters": parameters}})
    return tools


def load_tools() -> list[dict]:
    """The shipped tools (tools.json)."""
    return json.loads(TOOLS_FILE.read_text())


def to_plain(message):
    """A ROS message (or a list or array of them) as JSON-ready Python values. Times become seconds since the
    epoch; bytes (a sighting's JPEG crop) are left out, said in a few words: a language model reads no pixels."""
    if type(message).__name__ == "Time" and hasattr(message, "nanosec"):
        from ego_ros.ros.client import seconds

        return seconds(message)
    if isinstance(message, bytes) or getattr(message, "typecode", None) == "B":
        return f"({len(message)} bytes, left out)"
    if hasattr(message, "get_fields_and_field_types"):
        return {name: to_plain(getattr(message, name)) for name in message.get_fields_and_field_types()}
    if isinstance(message, (list, tuple)) or type(message).__name__ in ("array", "ndarray"):
        return [to_plain(item) for item in message]
    return message


def call_tool(commander, name: str, arguments: dict | str, timeout: float | None = None) -> dict:
    """Run the tool call ``name(arguments)`` (a dict, or the JSON text an LLM produced) on the commander's node;
    the response as a dict (``success`` and ``message`` say whether it worked). Unknown tools, unknown arguments
    and values of the wrong type raise ValueError before anything is sent."""
    from ego_ros import srv
    from ego_ros.ros.client import new_request_id
    from ego_ros.ros.messages import time_msg

    if isinstance(arguments, str):
        arguments = json.loads(arguments or "{}")
    tools = {tool["function"]["name"]: tool["function"] for tool in load_tools()}
    if name not in tools:
        raise ValueError(f"no tool named {name!r}; tools: {sorted(tools)}")
    properties = tools[name]["parameters"]["properties"]
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {unknown}; arguments: {sorted(properties)}")
    missing = [key for key in tools[name]["parameters"].get("required", ()) if key not in arguments]
    if missing:
        raise ValueError(f"{name}: missing argument(s) {missing}")
    for key, value in arguments.items():
        _check(name, key, value, properties[key])
    request = getattr(srv, SERVICES[name]).Request()
    if hasattr(request, "request_id"):
        request.request_id = new_request_id()
    types = request.get_fields_and_field_types()
    for key, value in arguments.items():
        if types[key] == TIME:
            value = time_msg(value)
        elif properties[key].get("type") == "number":
            value = float(value)
        setattr(request, key, value)
    return to_plain(commander.call(name, request).result(timeout))


_JSON_TYPES = {"string": str, "boolean": bool, "integer": int, "number": (int, float)}


def _check(tool: str, key: str, value, schema: dict) -> None:
    if schema["type"] == "array":
        if not isinstance(value, list):
            raise ValueError(f"{tool}: {key} must be a list")
        for item in value:
            _check(tool, key, item, schema["items"])
        return
    expected = _JSON_TYPES[schema["type"]]
    if not isinstance(value, expected) or (schema["type"] != "boolean" and isinstance(value, bool)):
        raise ValueError(f"{tool}: {key} must be a {schema['type']}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{tool}: {key} must be one of {schema['enum']}, got {value!r}")
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    if schema["type"] in ("integer", "number") and not low <= value <= high:
        raise ValueError(f"{tool}: {key} must be in [{low}, {high}], got {value!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = json.dumps(generate(), indent=2, ensure_ascii=False) + "\n"
    if argv == ["--write"]:
        TOOLS_FILE.write_text(text)
        print(f"wrote {TOOLS_FILE}")
    elif not argv:
        sys.stdout.write(text)
    else:
        print("usage: python -m ego_ros.ros.tools [--write]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
