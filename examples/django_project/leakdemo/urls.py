"""The example's URLs."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("export/", views.start_export),
    path("pooled-export/", views.start_pooled_export),
    path("pooled/", views.pooled_status),
]
