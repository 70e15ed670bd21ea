-- Pomi (seed 004_72cd5f7c906c7c6d.txt, "Pomi Database Schema"): the PostgreSQL tables as the
-- seed defines them, in its order (its MongoDB collections are not tidemill's). Nothing added:
-- gen_random_uuid() is built in since PostgreSQL 13.

CREATE TABLE users (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  email VARCHAR(255) UNIQUE NOT NULL,
  username VARCHAR(100) UNIQUE NOT NULL,
  password_hash VARCHAR(255) NOT NULL,
  first_name VARCHAR(100),
  last_name VARCHAR(100),
  phone VARCHAR(20),
  avatar_url VARCHAR(500),
  bio TEXT,
  language VARCHAR(10) DEFAULT 'en', -- en, am, ti, om
  country VARCHAR(100),
  city VARCHAR(100),
  zip_code VARCHAR(20),
  email_verified BOOLEAN DEFAULT FALSE,
  email_verified_at TIMESTAMP,
  phone_verified BOOLEAN DEFAULT FALSE,
  phone_verified_at TIMESTAMP,
  status VARCHAR(50) DEFAULT 'active', -- active, suspended, deleted
  is_admin BOOLEAN DEFAULT FALSE,
  is_moderator BOOLEAN DEFAULT FALSE,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  deleted_at TIMESTAMP,
  last_login_at TIMESTAMP
);

CREATE INDEX idx_users_email ON users(email);

CREATE INDEX idx_users_username ON users(username);

CREATE INDEX idx_users_status ON users(status);

CREATE TABLE auth_tokens (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  token VARCHAR(500) NOT NULL UNIQUE,
  type VARCHAR(50) DEFAULT 'access', -- access, refresh
  expires_at TIMESTAMP NOT NULL,
  revoked BOOLEAN DEFAULT FALSE,
  revoked_at TIMESTAMP,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX idx_auth_tokens_user_id ON auth_tokens(user_id);

CREATE INDEX idx_auth_tokens_token ON auth_tokens(token);

CREATE INDEX idx_auth_tokens_expires_at ON auth_tokens(expires_at);

CREATE TABLE email_verifications (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  email VARCHAR(255) NOT NULL,
  code VARCHAR(10) NOT NULL UNIQUE,
  attempts INT DEFAULT 0,
  max_attempts INT DEFAULT 3,
  expires_at TIMESTAMP NOT NULL,
  verified_at TIMESTAMP,
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX idx_email_verifications_user_id ON email_verifications(user_id);

CREATE INDEX idx_email_verifications_code ON email_verifications(code);

CREATE TABLE events (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  title VARCHAR(255) NOT NULL,
  description TEXT,
  location VARCHAR(500),
  address VARCHAR(500),
  latitude DECIMAL(9,6),
  longitude DECIMAL(9,6),
  category VARCHAR(100), -- cultural, social, business, educational
  start_date TIMESTAMP NOT NULL,
  end_date TIMESTAMP NOT NULL,
  capacity INT,
  image_url VARCHAR(500),
  status VARCHAR(50) DEFAULT 'draft', -- draft, published, cancelled, completed
  language VARCHAR(10) DEFAULT 'en',
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  deleted_at TIMESTAMP
);

CREATE INDEX idx_events_user_id ON events(user_id);

CREATE INDEX idx_events_status ON events(status);

CREATE INDEX idx_events_start_date ON events(start_date);

CREATE INDEX idx_events_category ON events(category);

CREATE TABLE event_rsvps (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  event_id UUID NOT NULL REFERENCES events(id) ON DELETE CASCADE,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  status VARCHAR(50) DEFAULT 'going', -- going, interested, maybe, no
  guests_count INT DEFAULT 1,
  rsvped_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  UNIQUE(event_id, user_id)
);

CREATE INDEX idx_event_rsvps_event_id ON event_rsvps(event_id);

CREATE INDEX idx_event_rsvps_user_id ON event_rsvps(user_id);

CREATE TABLE marketplace_listings (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  seller_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  title VARCHAR(255) NOT NULL,
  description TEXT,
  category VARCHAR(100), -- furniture, electronics, services, etc
  price DECIMAL(10,2),
  currency VARCHAR(3) DEFAULT 'CAD',
  status VARCHAR(50) DEFAULT 'active', -- active, sold, pending, expired
  image_urls TEXT[],
  location VARCHAR(500),
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  deleted_at TIMESTAMP
);

CREATE INDEX idx_marketplace_listings_seller_id ON marketplace_listings(seller_id);

CREATE INDEX idx_marketplace_listings_status ON marketplace_listings(status);

CREATE INDEX idx_marketplace_listings_category ON marketplace_listings(category);

CREATE TABLE businesses (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  owner_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  business_name VARCHAR(255) NOT NULL,
  description TEXT,
  category VARCHAR(100), -- restaurant, services, retail, etc
  phone VARCHAR(20),
  email VARCHAR(255),
  website VARCHAR(500),
  address VARCHAR(500),
  latitude DECIMAL(9,6),
  longitude DECIMAL(9,6),
  image_url VARCHAR(500),
  hours_of_operation VARCHAR(255),
  rating DECIMAL(3,2) DEFAULT 0,
  verified BOOLEAN DEFAULT FALSE,
  status VARCHAR(50) DEFAULT 'draft', -- draft, published, verified, suspended
  created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  deleted_at TIMESTAMP
);

CREATE INDEX idx_businesses_owner_id ON businesses(owner_id);

CREATE INDEX idx_businesses_category ON businesses(category);

CREATE INDEX idx_businesses_status ON businesses(status);

CREATE INDEX idx_businesses_verified ON businesses(verified);
