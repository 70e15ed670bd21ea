"""Signing in and out: the sign-in form and its limits, sign-out, and sign-out everywhere."""

from __future__ import annotations

import secrets

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from core.log import get_logger
from web import auth
from web.dashboard.core import DashboardBase, local_target

log = get_logger("web.dashboard")

HELD = {
    "delay": "Too many failed sign-ins from here for this account; wait {s} s and try again.",
    "address": "Too many failed sign-ins from this address; wait {s} s.",
    "account": (
        "This account has seen many failed sign-ins; addresses that failed are held for {s} s. "
        "An operator can run `tidemill dashboard unlock NAME`."
    ),
}


class SignIn(DashboardBase):
    async def login_form(self, request: Request) -> Response:
        token = request.cookies.get(auth.LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        response = self.render(
            request,
            "dashboard/login.html",
            session=None,
            csrf=token,
            next=local_target(request.query_params.get("next"), "/dashboard"),
            error=None,
            no_accounts=not self.accounts,
        )
        self.set_cookie(request, response, auth.LOGIN_CSRF_COOKIE, token, max_age=3600)
        return response

    async def login(self, request: Request) -> Response:
        try:
            form = await self.form(request)
        except ValueError:
            return self.refuse(request, None, "form too large", 413)
        cookie_token = request.cookies.get(auth.LOGIN_CSRF_COOKIE)
        if not auth.csrf_ok(cookie_token, form.get("csrf")):
            return await self.refuse_csrf(request, None)
        user = form.get("username", "").strip()[:100]
        password = form.get("password", "")
        address = self.address(request)
        target = local_target(form.get("next"), "/dashboard")

        def again(error: str, status: int, headers: dict[str, str] | None = None) -> Response:
            response = self.render(
                request,
                "dashboard/login.html",
                session=None,
                csrf=cookie_token,
                next=target,
                error=error,
                no_accounts=not self.accounts,
                status_code=status,
            )
            response.headers.update(headers or {})
            return response

        limiter = self.limiter()
        # counted before the password check, so concurrent guesses cannot all slip past
        verdict = await run_in_threadpool(limiter.attempt, user, address)
        if not verdict.allowed:
            await run_in_threadpool(
                self.audit_throttled,
                request,
                actor=user or None,
                action="dashboard.login_rate_limited",
                key=f"{verdict.reason}|{user.lower()}",
                reason=verdict.reason,
                retry_after_s=verdict.retry_after_s,
            )
            return again(
                HELD[verdict.reason].format(s=verdict.retry_after_s),
                429,
                {"Retry-After": str(verdict.retry_after_s)},
            )
        account = self.accounts.get(user)
        ok = await run_in_threadpool(
            auth.verify_password, password, account.password_hash if account else auth.dummy_hash()
        )
        if account is None or not ok:
            await run_in_threadpool(
                auth.audit,
                self.settings,
                actor=user or None,  # type: ignore[arg-type]
                action="dashboard.login_failed",
                entity_type="dashboard_session",
                details={"address": address, "known_account": account is not None},
            )
            log.warning("dashboard_login_failed", user=user, known_account=account is not None)
            return again("Wrong name or password.", 401)
        await run_in_threadpool(limiter.succeeded, user, address)

        def start() -> str:
            store = self.sessions
            # a new id at every sign-in; the session the browser carried (if any) ends
            old = store.load(request.cookies.get(auth.SESSION_COOKIE))
            if old is not None:
                store.end(old)
            _, cookie = store.create(account, address=address)
            auth.audit(
                self.settings,
                actor=account.name,
                action="dashboard.login",
                entity_type="dashboard_session",
                details={"address": address, "role": account.role},
            )
            return cookie

        cookie = await run_in_threadpool(start)
        log.info("dashboard_login", user=account.name, role=account.role)
        response = RedirectResponse(target, status_code=303)
        self.set_cookie(
            request, response, auth.SESSION_COOKIE, cookie, max_age=self.settings.session_ttl_s
        )
        response.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/dashboard")
        return response

    async def _signed_out(self, request: Request, *, everywhere: bool) -> Response:
        # signing out is allowed for every role, but still needs the CSRF token
        session = await run_in_threadpool(self.session_of, request)
        if session is None:
            return RedirectResponse("/dashboard/login", status_code=303)
        try:
            form = await self.form(request)
        except ValueError:
            return self.refuse(request, session, "form too large", 413)
        if not auth.csrf_ok(session.csrf, form.get("csrf")):
            return await self.refuse_csrf(request, session)

        def end() -> int:
            store = self.sessions
            if everywhere:
                ended = store.end_all(session.user)
            else:
                store.end(session)
                ended = 1
            auth.audit(
                self.settings,
                actor=session.user,
                action="dashboard.logout_everywhere" if everywhere else "dashboard.logout",
                entity_type="dashboard_session",
                details={"sessions": ended, "address": self.address(request)},
            )
            return ended

        await run_in_threadpool(end)
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(auth.SESSION_COOKIE, path="/dashboard")
        return response

    async def logout(self, request: Request) -> Response:
        return await self._signed_out(request, everywhere=False)

    async def logout_everywhere(self, request: Request) -> Response:
        return await self._signed_out(request, everywhere=True)
