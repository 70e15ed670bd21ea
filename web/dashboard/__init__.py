"""The operator dashboard: server-rendered pages under /dashboard (issue #8).

``broker_state`` reads queues and dead letters straight from the dramatiq Redis broker,
``store`` reads Postgres (webhooks, pipelines, backups, schedules), ``views`` renders pages and
performs actions; access control lives in ``web.auth``.
"""
