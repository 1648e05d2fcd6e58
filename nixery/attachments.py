"""What is published with an image besides its config and manifests: the builder's
"attach" step.

Documents about an image (signatures, SBOMs: referrers whose subject is one of its
manifests) join its blobs here, so that they are stored before its record appears
and garbage collection keeps them with it. None yet.
"""

from __future__ import annotations

from nixery.assembly import AssembledImage


def attach(image: AssembledImage) -> AssembledImage:
    """The image with the documents about it among its blobs."""
    return image
