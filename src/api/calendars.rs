//! `approvals.v1.Calendars`: CRUD of change calendars and their state at an instant (issue 26).
//! The layer checks the scopes (read to read, admin to write); calendars are not per project.

use std::sync::Arc;

use approvals_domain::validation::Violations;
use tonic::Request;

use super::{Answer, Context, answer, called, page_token};
use crate::{
    convert::{self, calendar},
    error::ApiError,
    pb::{self, calendars_server::Calendars},
};

pub struct CalendarsService {
    context: Arc<Context>,
}

impl CalendarsService {
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }
}

/// A calendar name to look up: required, and without NUL.
fn required_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    let mut v = Violations::default();
    v.no_nul(field, name);
    Ok(v.into_result()?)
}

/// The record of `body`, validated: every bad field at once.
fn validated(
    body: &pb::Calendar,
    now: approvals_domain::Timestamp,
) -> Result<approvals_domain::calendar::CalendarRecord, ApiError> {
    let mut v = Violations::default();
    let record = calendar::record(body, now, "calendar.", &mut v);
    if let Err(approvals_domain::DomainError::InvalidArgument(list)) = record.validate("") {
        for violation in list {
            let path = calendar::field_path(body, &violation.field);
            v.add(format!("calendar.{path}"), violation.description);
        }
    }
    v.into_result()?;
    Ok(record)
}

impl CalendarsService {
    async fn create(&self, req: pb::CreateCalendarRequest) -> Result<pb::Calendar, ApiError> {
        let Some(body) = req.calendar else {
            return Err(ApiError::invalid("calendar", "is required"));
        };
        let record = validated(&body, self.context.clock.now())?;
        let created = self.context.store.create_calendar(record).await?;
        Ok(calendar::calendar(&created))
    }

    async fn get(&self, name: &str) -> Result<pb::Calendar, ApiError> {
        required_name("name", name)?;
        let found = self.context.store.get_calendar(name).await?;
        Ok(calendar::calendar(&found))
    }

    async fn list(
        &self,
        req: pb::ListCalendarsRequest,
    ) -> Result<pb::ListCalendarsResponse, ApiError> {
        let page_size = page_token::page_size(
            req.page_size,
            page_token::DEFAULT_PAGE_SIZE,
            page_token::MAX_PAGE_SIZE,
        )?;
        let digest = page_token::query_digest(&["calendars"]);
        let after = page_token::decode(&req.page_token, &digest)?;
        let (calendars, next) = self
            .context
            .store
            .list_calendars(after.as_deref(), page_size)
            .await?;
        Ok(pb::ListCalendarsResponse {
            calendars: calendars.iter().map(calendar::calendar).collect(),
            next_page_token: next
                .map(|name| page_token::encode(&name, &digest))
                .unwrap_or_default(),
        })
    }

    async fn update(&self, req: pb::UpdateCalendarRequest) -> Result<pb::Calendar, ApiError> {
        let Some(body) = req.calendar else {
            return Err(ApiError::invalid("calendar", "is required"));
        };
        required_name("calendar.name", &body.name)?;
        let record = validated(&body, self.context.clock.now())?;
        let updated = self
            .context
            .store
            .update_calendar(&body.name, |current| {
                current.check_etag(Some(&body.etag))?;
                current.description = record.description;
                current.rules = record.rules;
                current.update_time = record.update_time;
                Ok(())
            })
            .await?;
        Ok(calendar::calendar(&updated))
    }

    async fn delete(&self, req: pb::DeleteCalendarRequest) -> Result<(), ApiError> {
        required_name("name", &req.name)?;
        self.context
            .store
            .delete_calendar(&req.name, self.context.clock.now(), |current| {
                current.check_etag(Some(&req.etag))
            })
            .await?;
        Ok(())
    }

    async fn state(&self, req: pb::GetCalendarStateRequest) -> Result<pb::CalendarState, ApiError> {
        required_name("calendar", &req.calendar)?;
        let at = match &req.time {
            Some(t) => convert::from_timestamp("time", t)?,
            None => self.context.clock.now(),
        };
        let record = self.context.store.get_calendar(&req.calendar).await?;
        let compiled = record.validate("")?;
        Ok(calendar::state(&record, at, &compiled.state_at(at)))
    }
}

#[tonic::async_trait]
impl Calendars for CalendarsService {
    async fn create_calendar(
        &self,
        request: Request<pb::CreateCalendarRequest>,
    ) -> Answer<pb::Calendar> {
        let (_, req) = called(request)?;
        answer(self.create(req).await)
    }

    async fn get_calendar(&self, request: Request<pb::GetCalendarRequest>) -> Answer<pb::Calendar> {
        let (_, req) = called(request)?;
        answer(self.get(&req.name).await)
    }

    async fn list_calendars(
        &self,
        request: Request<pb::ListCalendarsRequest>,
    ) -> Answer<pb::ListCalendarsResponse> {
        let (_, req) = called(request)?;
        answer(self.list(req).await)
    }

    async fn update_calendar(
        &self,
        request: Request<pb::UpdateCalendarRequest>,
    ) -> Answer<pb::Calendar> {
        let (_, req) = called(request)?;
        answer(self.update(req).await)
    }

    async fn delete_calendar(&self, request: Request<pb::DeleteCalendarRequest>) -> Answer<()> {
        let (_, req) = called(request)?;
        answer(self.delete(req).await)
    }

    async fn get_calendar_state(
        &self,
        request: Request<pb::GetCalendarStateRequest>,
    ) -> Answer<pb::CalendarState> {
        let (_, req) = called(request)?;
        answer(self.state(req).await)
    }
}
