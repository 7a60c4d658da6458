"""Building the actuator the settings name."""

from __future__ import annotations

from redis.asyncio import Redis

from services.controller.actuators.base import Actuator
from services.controller.actuators.local import LocalActuator
from shared.config import ControllerSettings


def make_actuator(settings: ControllerSettings, redis: Redis) -> Actuator:
    if settings.actuator == "kubernetes":
        from services.controller.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator(settings.kubernetes_namespace, settings.deployment_prefix, settings.kubeconfig)
    return LocalActuator(redis)
