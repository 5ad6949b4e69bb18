package sts

import (
	"fmt"
	"time"
)

// ActionIssueSession marks credentials the test issued directly with
// IssueSession (no request reached the fake), as EC2 issues an instance
// profile's credentials.
const ActionIssueSession = "IssueSession"

// IssueSession issues temporary credentials of roleARN for the session
// sessionName, valid for d, as EC2 does for an instance profile (its
// credentials are a session of the profile's role named after the
// instance id). They are recorded like every issue: GetCallerIdentity
// signed with them answers arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION,
// and they may sign AssumeRole (role chaining) until they expire. Reset
// forgets them. The mode and delay do not apply: nothing is asked of the
// fake over the wire.
func (s *Server) IssueSession(roleARN, sessionName string, d time.Duration) (Issued, error) {
	m := roleARNRe.FindStringSubmatch(roleARN)
	if m == nil {
		return Issued{}, fmt.Errorf("sts: %q is not a role ARN", roleARN)
	}
	if !sessionNameRe.MatchString(sessionName) {
		return Issued{}, fmt.Errorf("sts: %q is not a valid session name", sessionName)
	}
	if d < time.Second {
		return Issued{}, fmt.Errorf("sts: session length %s is shorter than a second", d)
	}
	account, roleName := m[1], m[3]
	now := s.cfg.Now().UTC()
	is := Issued{
		AccessKeyID:     "ASIA" + randString(16, upperAlnum),
		SecretAccessKey: randString(40, secretChars),
		SessionToken:    newSessionToken(),
		Expiration:      now.Add(d).Truncate(time.Second),
		IssuedAt:        now,
		RoleARN:         roleARN,
		RoleSessionName: sessionName,
		AssumedRoleARN:  fmt.Sprintf("arn:aws:sts::%s:assumed-role/%s/%s", account, roleName, sessionName),
		AssumedRoleID:   "AROA" + randString(17, upperAlnum) + ":" + sessionName,
		DurationSeconds: int(d / time.Second),
		Action:          ActionIssueSession,
	}
	s.issued.Add(is)
	return is, nil
}
