"""What a `POST /builds` asks for: the image and tag of its JSON object or form.

The image may be typed as it is pulled (`HOST/shell/curl:TAG`, `docker://...`); this registry's
own host is dropped, another registry's host, or a digest, is refused saying so. The fields
read are kept on the request (`layout.FORM`), so that an error page shows the form again.
"""

from __future__ import annotations

from aiohttp import web

from nixery import errors
from nixery.http import hosts
from nixery.http.bodies import content_type, holds_form, read_form, read_json
from nixery.http.web.layout import FORM
from nixery.registry.references import UnusableReference, image_of

#: What a JSON value or form field is called in an error message, by its Python type.
_VALUE_TYPES = {
    dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
    web.FileField: "a file",
}  # fmt: skip


async def build_request(request: web.Request) -> tuple[str, str]:
    """(image name, tag) of a `POST /builds`, its tag `latest` when none is given."""
    fields: dict[str, str] = {}
    if content_type(request) == "application/json":
        body = await read_json(request)
        if not isinstance(body, dict):
            raise errors.NameInvalid("the request body must be a JSON object with `image`")
        fields = {k: _text(k, v) for k, v in body.items() if k in ("image", "tag") and v is not None}
    elif holds_form(request):
        form = await read_form(request)
        fields = {k: _text(k, form[k]) for k in ("image", "tag") if k in form}
    else:  # a text/plain body `shell/curl` was read as a form without fields: "lists no packages"
        raise errors.RequestInvalid(
            "POST /builds takes a JSON object (application/json) or a form (application/x-www-form-urlencoded "
            "or multipart/form-data) with an `image` field; this request's body is neither"
        )
    request[FORM] = fields  # an error page shows the form again
    if "image" not in fields:
        raise errors.NameInvalid("the request names no image: give an `image` field, as image=shell/curl or "
                                 '{"image": "shell/curl"}')
    return _split_reference(fields["image"], fields.get("tag", "").strip(), hosts.origin(request))


def _split_reference(text: str, tag: str, origin: str) -> tuple[str, str]:
    """`HOST/shell/curl:tag` as typed or pasted: drop this registry's host (`origin`'s), split off
    the tag. Another registry's `host:port/`, or a digest, is refused saying so (its port is no tag)."""
    text = text.strip().removeprefix("docker://").strip("/")  # the scheme first: `docker://` alone is no name
    try:
        text = image_of(text, origin)
    except UnusableReference as exc:
        raise errors.NameInvalid(str(exc)) from None
    if ":" in text:
        text, given = text.split(":", 1)
        if tag and given and tag != given:  # one of them was dropped without a word (as `nixery build` refuses)
            raise errors.TagInvalid("the image names one tag (after its ':') and the tag field another: give one")
        tag = tag or given
    return text, tag or "latest"


def _text(field: str, value: object) -> str:
    """A JSON body's or form's `image` or `tag`: a string. Python's text for anything else
    (`{'a': 1}`, `inf`, an uploaded file's FileField) was read as a name or a tag, and refused,
    if at all, for what it was not."""
    if isinstance(value, str):
        return value
    error = errors.NameInvalid if field == "image" else errors.TagInvalid
    raise error(f"`{field}` must be a string, not {_VALUE_TYPES.get(type(value), 'another kind of value')}",
                detail={"field": field})
