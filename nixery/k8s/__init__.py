"""NixImage objects from the Kubernetes API: list, watch, and report status.

Plain HTTP against the API server (aiohttp), no client library. The parts:

    credentials  the pod's service account or a kubeconfig (`load_kube_config`)
    client       the list, watch and status-patch calls (`KubeClient`, `ApiError`)
    decoding     their JSON, read even when one object nests too deep (`read_json`)
    objects      the objects as the watch knows them, read in a thread (`read_events`)
    watch        keeps the declaration store's `kubernetes` source equal to the
                 cluster's objects and writes each object's status (`NixImageWatch`)

This package depends on `nixery.declarations` (it feeds the declaration store);
the declarations know nothing of Kubernetes. `nixery.app` wires the two together
(`start_watch`) when NIXERY_K8S_WATCH is set.
"""

from nixery.k8s.client import MAX_EVENT_BYTES, PLURAL, ApiError, Gone, KubeClient
from nixery.k8s.credentials import (
    SERVICE_ACCOUNT_DIR,
    KubeConfig,
    KubeConfigError,
    in_cluster_available,
    in_cluster_config,
    kubeconfig_config,
    load_kube_config,
)
from nixery.k8s.objects import object_key
from nixery.k8s.watch import NixImageWatch, start_watch

__all__ = [
    "MAX_EVENT_BYTES",
    "PLURAL",
    "SERVICE_ACCOUNT_DIR",
    "ApiError",
    "Gone",
    "KubeClient",
    "KubeConfig",
    "KubeConfigError",
    "NixImageWatch",
    "in_cluster_available",
    "in_cluster_config",
    "kubeconfig_config",
    "load_kube_config",
    "object_key",
    "start_watch",
]
