"""URLs of the Django tests' views."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("ping/", views.ping),
    path("count/", views.count),
    path("atomic-leak/", views.atomic_leak),
    path("thread-leak/", views.thread_leak),
    path("pooled/", views.pooled_count),
    path("pooled-leak/", views.pooled_leak),
    path("async-count/", views.async_count),
    path("async-executor-leak/", views.async_executor_leak),
    path("async-executor-pooled-leak/", views.async_executor_pooled_leak),
    path("async-pooled/", views.async_pooled_count),
    path("pid/", views.backend_pid),
    path("slow/", views.slow_report),
    path("held/", views.held_until_released),
]
