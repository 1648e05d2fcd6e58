"""Declared images: NixImage documents that give an image a name, a tag and
its contents, as the original design's Kubernetes integration describes.

    apiVersion: k8s.nixos.org/v1alpha
    kind: NixImage
    metadata:
      name: curl-and-jq
    data:
      tag: v1
      contents: [curl, jq, bash]
      arch: amd64            # optional: amd64 (default), arm64, or [amd64, arm64]
      user: app              # optional, with workingDir, env, entrypoint, cmd,
                             # exposedPorts, labels: the image config (`run_config`)

A pull of `HOST/curl-and-jq:v1` then builds the image `HOST/bash/curl/jq`
would. Declarations come from YAML files in a directory (NIXERY_IMAGES_PATH)
and, when configured, from NixImage objects in a Kubernetes cluster
(`nixery.k8s`, which `nixery.app` starts; this package knows nothing of it).
This package holds the table both feed and answers the HTTP layer's question
"is this name:tag declared?" (`routes.ImageResolver`). Its modules:
`parsing` (documents), `run_config` (the image config fields), `problems`
(what a problem says), `files` (the YAML files), `store` (the table, builds).

Rules
-----
* `contents` entries follow the rules of image path components
  (`nixery.registry.names`): letters, digits, `_ - +`, `.` between attribute
  names; `shell` and other meta-packages work as in paths; order and repeats
  do not matter; at most `MAX_PACKAGES`. The architecture is `data.arch`, not
  an `arm64` entry; a list of several platforms makes the image an index over
  one image per platform (`nixery.platforms`), whatever NIXERY_PLATFORMS says.
  `metadata.name` must be a Kubernetes object name (lower case DNS subdomain)
  that is also a valid image path, so it is at most 128 characters and not
  `arm64`. `data.tag` follows the rules of image tags.
* The image config fields are optional; a declaration without them is the
  image its contents give as a path, one with them another image (the config
  is part of its key: `nixery.registry.runconfig`).
* The tag is passed on to the package source as for any pull: with a git
  package source (NIXERY_PKGS_REPO) it also selects the git ref.
* **Names and packages.** A declaration claims one `name:tag` pair, not the
  whole name. A pull of exactly that pair builds the declared contents; every
  other pull reads the name as a list of packages as usual. So a NixImage
  `hello` with tag `v1` serves `hello:v1`, while `hello:latest` is still the
  `hello` package, and `curl-and-jq:v2` (not declared) is a request for a
  package called `curl-and-jq`, which fails as an unknown package would.
* **Duplicates.** When several declarations claim the same `name:tag`, files
  win over Kubernetes objects; among files the first in path order (then
  document order) wins; among objects the oldest (creation time, then name).
  The others are reported as conflicts and ignored until the winner goes.
* **Invalid documents** (unreadable or malformed YAML, another kind or
  apiVersion, a missing or invalid name, tag or contents, unknown fields) are
  reported with a `declarations.invalid` log line naming the file and
  document (or the object) and the problem, and skipped; everything else
  keeps working. Values quoted in problems are cut to a few dozen characters
  (`_short`), and a file's problems are logged once per change of the file,
  at most `MAX_LOGGED_PER_FILE` of them. A file that cannot be read or parsed
  (not valid YAML, past a limit below, or any other failure) is skipped as a
  whole, alone.
* **Limits** (`nixery.yaml_files`): at most `MAX_DECLARATION_FILES` (1,000)
  files are read, the first by path; past it the others are ignored, with one
  `declarations.too_many_files` error per count naming the limit and the count
  (also a `Problem` of the directory). Only regular files of at most 1 MiB are
  read; YAML is parsed with limits on aliases, nesting and numbers, and a key
  given twice in one mapping makes the file invalid; directory
  symlinks are followed only to directories inside the tree not visited yet.
* **Changes.** Files are checked on every pull by tag (one `stat` per file;
  only changed files are read again) and every NIXERY_IMAGES_POLL seconds in
  the background, so an edited file affects the next pull. Files are
  `*.yaml`, `*.yml` and `*.json` under the path (searched recursively, hidden
  entries skipped: a mounted ConfigMap works). Scans run in a thread of their
  own, one at a time: a pull that arrives during a scan waits for the next
  one, which every pull waiting then shares, so scans never pile up and the
  event loop never reads or parses a file. A pull waits for a scan at most
  `SCAN_WAIT` (1 s): files that take longer (written to be slow) delay pulls
  by that much, not by the scan, which goes on.
* **Pre-building** (NIXERY_PREBUILD=true): a declaration that appears or
  changes is built in the background at once, so the first pod start does not
  wait for Nix.
"""

from nixery.declarations.files import MAX_DECLARATION_FILES, DeclarationFiles, Problem
from nixery.declarations.parsing import (
    API_VERSION,
    FILE_SUFFIXES,
    FILES,
    GROUP,
    KIND,
    KUBERNETES,
    LIST_KINDS,
    MAX_LOGGED_PER_FILE,
    MAX_NAME_LENGTH,
    VERSION,
    Declaration,
    parse_declaration,
)
from nixery.declarations.problems import SHORT_VALUE, InvalidDeclaration
from nixery.declarations.store import DeclarationStore, StatusReporter, open_declarations

__all__ = [
    "API_VERSION",
    "FILE_SUFFIXES",
    "FILES",
    "GROUP",
    "KIND",
    "KUBERNETES",
    "LIST_KINDS",
    "MAX_DECLARATION_FILES",
    "MAX_LOGGED_PER_FILE",
    "MAX_NAME_LENGTH",
    "SHORT_VALUE",
    "VERSION",
    "Declaration",
    "DeclarationFiles",
    "DeclarationStore",
    "InvalidDeclaration",
    "Problem",
    "StatusReporter",
    "open_declarations",
    "parse_declaration",
]
