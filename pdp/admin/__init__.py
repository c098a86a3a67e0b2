"""The admin endpoint: approvers' JSON API and HTML page, health and metrics, on its own port."""
